//! Each section checked node by node into its typed form.

use super::keys::{
    did_you_mean, COREOS, DROP_IN, ETCD, ETCD2, ETCD2_URL_LISTS, FLANNEL, FLEET, LOCKSMITH, NIMBUS,
    OEM, SWARM, UNIT, UPDATE, USER, WRITE_FILE,
};
use super::values::{
    check_url, check_url_at, decode, owner_ok, parse_mode, path_problem, swarm_addr_ok, truncate,
    valid_hostname, valid_unit_name, valid_user_name,
};
use super::Swarm;
use super::{
    Checker, CloudConfig, EnvDropIn, Locksmith, NimbusSection, Unit, Update, User, WriteFile,
    ENCODINGS, NETWORK_SUFFIXES, UNIT_COMMANDS, UNIT_SUFFIXES,
};
use crate::yaml::{Kind, Node};
use std::collections::BTreeMap;

pub(super) fn ssh_keys(c: &mut Checker, v: &Node, what: &str) -> Vec<String> {
    let keys = c.strings(v, what);
    for (k, n) in keys.iter().zip(match &v.kind {
        Kind::Seq(items) => items.as_slice(),
        _ => &[],
    }) {
        if k.contains('\n') {
            c.error(n.line, format!("{what}: a key must be one line"));
        } else if !k
            .split_whitespace()
            .any(|w| w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-"))
        {
            c.warn(
                n.line,
                format!(
                    "{what}: {:?} does not look like an OpenSSH public key",
                    truncate(k)
                ),
            );
        }
    }
    keys
}

pub(super) fn user(c: &mut Checker, n: &Node) -> Option<User> {
    let mut u = User::default();
    let mut has_name = false;
    let mut name_given = false;
    c.map(n, "users entry", USER, |c, key, v| match key {
        "name" => {
            name_given = true;
            if let Some(s) = c.string(v, "users.name") {
                if valid_user_name(&s) {
                    u.name = s;
                    has_name = true;
                } else {
                    c.error(
                        v.line,
                        format!("user name {s:?} is not valid ([a-z_][a-z0-9_-]*, at most 32)"),
                    );
                }
            }
        }
        "passwd" => u.passwd = account_field(c, v, "passwd"),
        "gecos" => u.gecos = account_field(c, v, "gecos"),
        "homedir" => {
            u.homedir = account_field(c, v, "homedir");
            if let Some(p) = u.homedir.as_deref().and_then(path_problem) {
                c.error(v.line, format!("homedir: {p}"));
            }
        }
        "no_create_home" => u.no_create_home = c.boolean(v, "no_create_home").unwrap_or(false),
        "primary_group" => u.primary_group = account_field(c, v, "primary_group"),
        "groups" => {
            u.groups = c.strings(v, "groups");
            if let Some(bad) = u.groups.iter().find(|g| !valid_user_name(g)) {
                c.error(
                    v.line,
                    format!(
                        "groups: {bad:?} is not a valid group name ([a-z_][a-z0-9_-]*, at most 32)"
                    ),
                );
            }
        }
        "no_user_group" => u.no_user_group = c.boolean(v, "no_user_group").unwrap_or(false),
        "system" => u.system = c.boolean(v, "system").unwrap_or(false),
        "no_log_init" => {
            c.boolean(v, "no_log_init");
        }
        "shell" => u.shell = account_field(c, v, "shell"),
        "ssh_authorized_keys" => {
            u.ssh_authorized_keys = ssh_keys(c, v, "users.ssh_authorized_keys")
        }
        "coreos_ssh_import_github" | "coreos_ssh_import_github_users" | "coreos_ssh_import_url" => {
            c.warn(
                c.key_line,
                format!("{key} is not supported by Nimbus (no key fetching at boot); ignored"),
            );
        }
        _ => {}
    });
    if !has_name {
        if !name_given && matches!(n.kind, Kind::Map(_)) {
            c.error(n.line, "users entry has no `name`");
        }
        return None;
    }
    if let Some(p) = &u.passwd {
        if !p.starts_with('$') && p != "*" && p != "!" {
            c.warn(n.line, format!("user {}: passwd should be a crypt(3) hash (e.g. from `mkpasswd -m sha-512`), not a clear-text password", u.name));
        }
    }
    Some(u)
}

/// A value that goes into a field of /etc/passwd, /etc/shadow or
/// /etc/group: a `:` would start another field and a line break another
/// account (`gecos: "x\nroot2::0:0::/:/bin/sh"` must not make a root
/// account).
pub(super) fn account_field(c: &mut Checker, v: &Node, key: &str) -> Option<String> {
    let s = c.string(v, key)?;
    if let Some(ch) = s.chars().find(|ch| matches!(ch, ':' | '\n' | '\r' | '\0')) {
        c.error(
            v.line,
            format!(
                "users.{key}: {ch:?} is not allowed (it would split the account database line)"
            ),
        );
        return None;
    }
    Some(s)
}

pub(super) fn write_file(c: &mut Checker, n: &Node) -> Option<WriteFile> {
    let mut path = None;
    let mut content = (String::new(), n.line);
    let mut encoding = (String::new(), n.line);
    let mut owner = None;
    let mut permissions = 0o644;
    let mut path_given = false;
    c.map(n, "write_files entry", WRITE_FILE, |c, key, v| match key {
        "path" => {
            path_given = true;
            if let Some(p) = c.string(v, "path") {
                match path_problem(&p) {
                    Some(e) => c.error(v.line, format!("write_files: {e}")),
                    None => path = Some(p),
                }
            }
        }
        "content" => content = (c.string(v, "content").unwrap_or_default(), v.line),
        "encoding" => {
            let e = c.string(v, "encoding").unwrap_or_default();
            if !ENCODINGS.contains(&e.to_ascii_lowercase().as_str()) {
                let hint = did_you_mean(&e, ENCODINGS).map(|s| format!("; did you mean {s:?}?")).unwrap_or_default();
                c.error(v.line, format!("unknown encoding {e:?} (use b64, base64, gz, gzip, gz+b64, gzip+base64, ...){hint}"));
            }
            encoding = (e, v.line);
        }
        "owner" => {
            if let Some(o) = c.string(v, "owner") {
                if owner_ok(&o) {
                    owner = Some(o);
                } else {
                    c.error(v.line, format!("owner {o:?} must be USER or USER:GROUP (names or numbers)"));
                }
            }
        }
        "permissions" => match v.as_str().and_then(parse_mode) {
            Some(m) => permissions = m,
            None => c.error(v.line, format!("permissions {:?} must be an octal mode such as \"0644\"", v.as_str().unwrap_or(v.type_name()))),
        },
        _ => {}
    });
    let Some(path) = path else {
        if !path_given && matches!(n.kind, Kind::Map(_)) {
            c.error(n.line, "write_files entry has no `path`");
        }
        return None;
    };
    match decode(&content.0, &encoding.0) {
        Ok(data) => Some(WriteFile {
            path,
            content: data,
            owner,
            permissions,
        }),
        Err(e) => {
            c.error(
                content.1.max(encoding.1),
                format!("write_files {path}: {e} (encoding {:?})", encoding.0),
            );
            None
        }
    }
}

/// etcd 0.4's keys (the CoreOS tutorial's user-data) that etcd 3 does not
/// read, and what replaces each in `coreos.etcd2`; the ports moved too.
/// (`name`, `discovery`, `data_dir` keep their ETCD_* names and work.)
const ETCD_REPLACED: &[(&str, &str)] = &[
    ("addr", "coreos.etcd2.advertise-client-urls (http://HOST:2379; 4001 was etcd 0.4's port)"),
    ("bind_addr", "coreos.etcd2.listen-client-urls (http://0.0.0.0:2379)"),
    ("peer_addr", "coreos.etcd2.initial-advertise-peer-urls (http://HOST:2380; 7001 was etcd 0.4's port), with initial-cluster"),
    ("peer_bind_addr", "coreos.etcd2.listen-peer-urls (http://0.0.0.0:2380)"),
    ("peers", "coreos.etcd2.initial-cluster (NAME=http://HOST:2380,...)"),
];

/// fleet's keys that meant something for the cluster, and Nimbus's keys.
const FLEET_REPLACED: &[(&str, &str)] = &[
    (
        "public_ip",
        "nimbus.swarm.advertise_addr (the address swarm peers reach this host at)",
    ),
    (
        "metadata",
        "node labels: `docker node update --label-add` on a manager",
    ),
    (
        "etcd_servers",
        "coreos.locksmith.endpoint for update-engine's etcd lock",
    ),
];

/// A warning on each key of `section` that `table` names, saying what
/// replaces it on Nimbus.
fn replaced_keys(c: &mut Checker, v: &Node, section: &str, table: &[(&str, &str)]) {
    let Kind::Map(entries) = &v.kind else { return };
    for (k, val) in entries {
        let Some(key) = k.as_str() else { continue };
        let norm = key.replace('-', "_");
        if let Some((_, with)) = table.iter().find(|(old, _)| *old == norm) {
            c.warn(
                val.line,
                format!("{section}.{key} is not read on Nimbus: use {with}"),
            );
        }
    }
}

pub(super) fn env_section(
    c: &mut Checker,
    v: &Node,
    section: &str,
    known: &[&str],
    prefix: &str,
    unit: &'static str,
) -> EnvDropIn {
    let mut vars = Vec::new();
    c.map(
        v,
        &format!("coreos.{section}"),
        known,
        |c, key, val| match &val.kind {
            Kind::Scalar { value, plain } => {
                let value = if *plain {
                    match value.to_ascii_lowercase().as_str() {
                        "yes" | "on" | "true" => "true".to_string(),
                        "no" | "off" | "false" => "false".to_string(),
                        _ => value.clone(),
                    }
                } else {
                    value.clone()
                };
                if value.contains('\n') {
                    c.error(val.line, format!("coreos.{section}.{key} must be one line"));
                }
                vars.push((format!("{prefix}{}", key.to_ascii_uppercase()), value));
            }
            _ => c.error(
                val.line,
                format!(
                    "coreos.{section}.{key} must be a scalar, found {}",
                    val.type_name()
                ),
            ),
        },
    );
    EnvDropIn { unit, vars }
}

pub(super) fn coreos(
    c: &mut Checker,
    n: &Node,
    cfg: &mut CloudConfig,
    exposed: &mut Vec<(usize, String)>,
) {
    let mut etcd_line = None;
    c.map(n, "coreos", COREOS, |c, key, v| match key {
        "etcd2" => {
            let kl = c.key_line;
            if let Some(l) = etcd_line {
                c.error(kl, format!("coreos.etcd2 and coreos.etcd (line {l}) both configure etcd.service; keep only etcd2"));
            }
            etcd_line = Some(kl);
            cfg.env_dropins.push(env_section(c, v, "etcd2", ETCD2, "ETCD_", "etcd.service"));
            etcd2_checks(c, v, exposed);
        }
        "etcd" => {
            let kl = c.key_line;
            if let Some(l) = etcd_line {
                c.error(kl, format!("coreos.etcd and coreos.etcd2 (line {l}) both configure etcd.service; keep only etcd2"));
            }
            etcd_line = Some(kl);
            c.warn(kl, "coreos.etcd configures etcd 0.4 and is deprecated; use coreos.etcd2 (Nimbus runs etcd 3 from Debian as etcd.service)");
            cfg.env_dropins.push(env_section(c, v, "etcd", ETCD, "ETCD_", "etcd.service"));
            replaced_keys(c, v, "coreos.etcd", ETCD_REPLACED);
        }
        "fleet" => {
            c.warn(c.key_line, "coreos.fleet is deprecated: fleet is not shipped with Nimbus; the drop-in is written but nothing reads it");
            replaced_keys(c, v, "coreos.fleet", FLEET_REPLACED);
            cfg.env_dropins.push(env_section(c, v, "fleet", FLEET, "FLEET_", "fleet.service"));
        }
        "flannel" => cfg.env_dropins.push(env_section(c, v, "flannel", FLANNEL, "FLANNELD_", "flanneld.service")),
        "update" => {
            let mut u = Update::default();
            c.map(v, "coreos.update", UPDATE, |c, key, val| {
                let Some(s) = c.string(val, &format!("coreos.update.{key}")) else { return };
                match key {
                    "reboot_strategy" => {
                        use nimbus::updateconf::RebootStrategy;
                        if s == "best-effort" {
                            c.warn(val.line, "reboot_strategy \"best-effort\" is deprecated; Nimbus uses \"etcd-lock\" for it");
                            u.reboot_strategy = Some(RebootStrategy::EtcdLock);
                        } else {
                            match s.parse::<RebootStrategy>() {
                                Ok(v) => u.reboot_strategy = Some(v),
                                Err(why) => {
                                    let hint = did_you_mean(&s, &RebootStrategy::NAMES).map(|x| format!("; did you mean {x:?}?")).unwrap_or_default();
                                    c.error(val.line, format!("reboot_strategy {why}{hint}"));
                                }
                            }
                        }
                    }
                    "server" => {
                        if s != "disabled" {
                            check_url(c, val, "coreos.update.server", &s);
                        }
                        u.server = Some(s);
                    }
                    "group" => {
                        if nimbus::release::valid_channel_name(&s) {
                            u.group = Some(s);
                        } else {
                            c.error(val.line, format!("coreos.update.group {s:?} is not a valid channel name ([a-z0-9._-])"));
                        }
                    }
                    _ => {}
                }
            });
            cfg.update = Some(u);
        }
        "locksmith" => {
            let kl = c.key_line;
            let mut l = Locksmith::default();
            c.map(v, "coreos.locksmith", LOCKSMITH, |c, key, val| {
                let Some(s) = c.string(val, &format!("coreos.locksmith.{key}")) else { return };
                match key {
                    "window_start" => match nimbus::updateconf::check_window_start(&s) {
                        Ok(()) => l.window_start = Some(s),
                        Err(e) => c.error(val.line, format!("coreos.locksmith.window_start {e}")),
                    },
                    "window_length" => match nimbus::updateconf::parse_duration(&s) {
                        Ok(_) => l.window_length = Some(s),
                        Err(e) => c.error(val.line, format!("coreos.locksmith.window_length {e}")),
                    },
                    "endpoint" => {
                        for url in s.split(',') {
                            check_url(c, val, "coreos.locksmith.endpoint", url.trim());
                        }
                        l.endpoint = Some(s);
                    }
                    "fleetlock_url" => match nimbus::updateconf::check_fleetlock_url(&s) {
                        Ok(()) => l.fleetlock_url = Some(s),
                        Err(e) => c.error(val.line, format!("coreos.locksmith.fleetlock_url {e}")),
                    },
                    "fleetlock_group" => match nimbus::updateconf::check_fleetlock_group(&s) {
                        Ok(()) => l.fleetlock_group = Some(s),
                        Err(e) => c.error(val.line, format!("coreos.locksmith.fleetlock_group {e}")),
                    },
                    "etcd_cafile" => l.etcd_cafile = Some(s),
                    "etcd_certfile" => l.etcd_certfile = Some(s),
                    "etcd_keyfile" => l.etcd_keyfile = Some(s),
                    "group" => l.group = Some(s),
                    _ => {}
                }
            });
            if l.window_start.is_some() != l.window_length.is_some() {
                c.error(kl, "coreos.locksmith: window_start and window_length go together");
            }
            cfg.locksmith = Some(l);
        }
        "oem" => {
            c.map(v, "coreos.oem", OEM, |c, key, val| {
                if let Some(s) = c.string(val, &format!("coreos.oem.{key}")) {
                    cfg.oem.push((key.to_string(), s));
                }
            });
        }
        "units" => {
            for u in c.list(v, "coreos.units") {
                if let Some(unit) = unit(c, u) {
                    cfg.units.push(unit);
                }
            }
        }
        _ => {}
    });
}

pub(super) fn nimbus_section(c: &mut Checker, n: &Node) -> NimbusSection {
    let mut out = NimbusSection::default();
    c.map(n, "nimbus", NIMBUS, |c, key, v| match key {
        "etcd_insecure_plaintext" => {
            if let Some(b) = c.boolean(v, "nimbus.etcd_insecure_plaintext") {
                out.etcd_insecure_plaintext = b;
            }
        }
        "hook_timeout" => {
            if let Some(s) = c.string(v, "nimbus.hook_timeout") {
                match nimbus::updateconf::parse_hook_timeout(&s) {
                    Ok(_) => out.hook_timeout = Some(s),
                    Err(e) => c.error(v.line, format!("nimbus.hook_timeout {e}")),
                }
            }
        }
        "swarm" => {
            use nimbus::swarmconf::Init;
            let kl = c.key_line;
            let mut sw = Swarm::default();
            let mut role = None;
            let mut ok = true;
            c.map(v, "nimbus.swarm", SWARM, |c, key, val| match key {
                "role" => match c.string(val, "nimbus.swarm.role").map(|r| r.parse::<nimbus::swarmconf::Role>()) {
                    Some(Ok(r)) => role = Some(r),
                    Some(Err(e)) => {
                        ok = false;
                        c.error(val.line, format!("nimbus.swarm.role {e}"));
                    }
                    None => ok = false,
                },
                "init" => {
                    sw.init = match &val.kind {
                        Kind::Scalar { value, .. } if value.eq_ignore_ascii_case("auto") => Init::Auto,
                        _ => match c.boolean(val, "nimbus.swarm.init (or `auto`)") {
                            Some(true) => Init::Yes,
                            Some(false) => Init::No,
                            None => {
                                ok = false;
                                Init::No
                            }
                        },
                    }
                }
                "advertise_addr" | "listen_addr" => {
                    if let Some(a) = c.string(val, &format!("nimbus.swarm.{key}")) {
                        if !swarm_addr_ok(&a, true) {
                            ok = false;
                            c.error(val.line, format!("nimbus.swarm.{key} {a:?} is not an IP address, IP:port or interface name"));
                        } else if key == "advertise_addr" {
                            sw.advertise_addr = a;
                        } else {
                            sw.listen_addr = Some(a);
                        }
                    }
                }
                "join" => {
                    let list = match &val.kind {
                        Kind::Seq(_) => c.strings(val, "nimbus.swarm.join"),
                        _ => c
                            .string(val, "nimbus.swarm.join")
                            .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
                            .unwrap_or_default(),
                    };
                    for a in &list {
                        let hostport = a.rsplit_once(':').is_some_and(|(h, p)| {
                            !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) && (h.parse::<std::net::IpAddr>().is_ok() || valid_hostname(h))
                        });
                        if !(hostport || a.parse::<std::net::IpAddr>().is_ok()) {
                            ok = false;
                            c.error(val.line, format!("nimbus.swarm.join: {a:?} is not a manager address (IP or host, optionally :port)"));
                        }
                    }
                    sw.join = list;
                }
                "join_token" => {
                    if let Some(t) = c.string(val, "nimbus.swarm.join_token") {
                        let parts: Vec<&str> = t.split('-').collect();
                        if parts.len() == 4 && parts[0] == "SWMTKN" && parts[1] == "1" && parts[2..].iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric())) {
                            sw.join_token = Some(t);
                        } else {
                            ok = false;
                            c.error(val.line, "nimbus.swarm.join_token is not a swarm join token (SWMTKN-1-...-...)");
                        }
                    }
                }
                "secret" => {
                    if let Some(t) = c.string(val, "nimbus.swarm.secret") {
                        match nimbus::swarmconf::parse_secret(&t) {
                            Ok(s) => sw.secret = Some(s),
                            Err(e) => {
                                ok = false;
                                c.error(val.line, format!("nimbus.swarm.secret {e}"));
                            }
                        }
                    }
                }
                "managers" => {
                    let list = c.strings(val, "nimbus.swarm.managers");
                    if let Some(h) = list.iter().find(|h| !nimbus::swarmconf::hostname_ok(h)) {
                        ok = false;
                        c.error(val.line, format!("nimbus.swarm.managers: {h:?} is not a host name"));
                    }
                    sw.managers = list;
                }
                _ => {}
            });
            if ok && matches!(v.kind, Kind::Map(_)) {
                sw.role = role.unwrap_or_default();
                if role.is_none() {
                    c.error(kl, "nimbus.swarm needs `role` (manager or worker)");
                } else if sw.advertise_addr.is_empty() {
                    c.error(kl, "nimbus.swarm needs `advertise_addr`: the address other hosts reach this one at");
                } else if sw.init != Init::No && !sw.manager() {
                    c.error(kl, "nimbus.swarm: only a manager can `init` a swarm");
                } else if sw.init == Init::Yes && (!sw.join.is_empty() || sw.join_token.is_some()) {
                    c.error(kl, "nimbus.swarm: `init` starts a new swarm; it does not go with `join` or `join_token`");
                } else if sw.init == Init::Auto && (sw.secret.is_none() || sw.join_token.is_some()) {
                    c.error(kl, "nimbus.swarm: `init: auto` needs `secret` (the other hosts open the worker token the first one publishes with it) and no `join_token`");
                } else if sw.init == Init::Auto && sw.advertise_addr.parse::<std::net::IpAddr>().is_err() && sw.advertise_addr.parse::<std::net::SocketAddr>().is_err() {
                    c.error(kl, format!("nimbus.swarm: with `init: auto` the other hosts join the founder at its advertise_addr, so it must be an address ($private_ipv4), not {:?}", sw.advertise_addr));
                } else if sw.init == Init::No && sw.join.is_empty() {
                    c.error(kl, "nimbus.swarm: give `join` (the managers' addresses), `init: true` on the one host that starts the swarm, or `init: auto` on every manager (the first to come up starts it)");
                } else if sw.init == Init::No && sw.secret.is_none() && sw.join_token.is_none() {
                    c.error(kl, "nimbus.swarm: a joining host needs `secret` (the cluster's, which opens the worker token sealed in etcd) or `join_token`");
                } else {
                    if sw.init == Init::Yes && sw.secret.is_none() {
                        c.warn(kl, "nimbus.swarm: without `secret` the worker token is not published in etcd; every other host needs `join_token`");
                    }
                    out.swarm = Some(sw);
                }
            }
        }
        _ => {}
    });
    out
}

/// etcd refuses to start on these mistakes, late and in its own log: say
/// so while validating, with the line.
/// Whether `url` (an etcd listen or advertise URL) reaches beyond this
/// host: anything but a loopback address or `localhost`.
fn off_host(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" {
        return false;
    }
    host.parse::<std::net::IpAddr>()
        .map_or(true, |a| !a.is_loopback())
}

/// etcd that other machines can reach must speak TLS and require client
/// certificates, for clients and for peers: what is not goes to `exposed`
/// (line, what), which the caller reports.
fn etcd2_exposure(vals: &BTreeMap<String, (String, usize)>, exposed: &mut Vec<(usize, String)>) {
    let on = |k: &str| vals.get(k).is_some_and(|(v, _)| v == "true");
    for (keys, auth, what) in [
        (
            &["listen_client_urls", "advertise_client_urls"][..],
            "client_cert_auth",
            "clients",
        ),
        (
            &["listen_peer_urls", "initial_advertise_peer_urls"][..],
            "peer_client_cert_auth",
            "peers",
        ),
    ] {
        for k in keys {
            let Some((v, line)) = vals.get(*k) else {
                continue;
            };
            for u in v.split(',').map(str::trim).filter(|u| off_host(u)) {
                if u.starts_with("http://") {
                    exposed.push((
                        *line,
                        format!("coreos.etcd2.{k}: {u} serves etcd's {what} in plain HTTP beyond this host"),
                    ));
                } else if u.starts_with("https://") && !on(auth) {
                    exposed.push((
                        *line,
                        format!("coreos.etcd2.{k}: {u} serves etcd's {what} over TLS but without {auth}: true, so any client is let in"),
                    ));
                }
            }
        }
    }
    // What the TLS settings need to work at all (etcd would refuse to start).
    for (auth, ca) in [
        ("client_cert_auth", "trusted_ca_file"),
        ("peer_client_cert_auth", "peer_trusted_ca_file"),
    ] {
        if on(auth) && !vals.contains_key(ca) {
            if let Some((_, line)) = vals.get(auth) {
                exposed.push((*line, format!("coreos.etcd2.{auth}: true without {ca} (which CA signs the certificates it accepts)")));
            }
        }
    }
}

pub(super) fn etcd2_checks(c: &mut Checker, n: &Node, exposed: &mut Vec<(usize, String)>) {
    let Kind::Map(entries) = &n.kind else { return };
    let mut vals: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for (k, v) in entries {
        if let (Some(k), Kind::Scalar { value, .. }) = (k.as_str(), &v.kind) {
            vals.insert(k.replace('-', "_"), (value.clone(), v.line));
        }
    }
    for (k, (v, line)) in &vals {
        if ETCD2_URL_LISTS.contains(&k.as_str()) {
            for u in v.split(',') {
                check_url_at(c, *line, &format!("coreos.etcd2.{k}:"), u.trim());
            }
        }
    }
    etcd2_exposure(&vals, exposed);
    if let Some((s, line)) = vals.get("initial_cluster_state") {
        if s != "new" && s != "existing" {
            c.error(
                *line,
                format!("coreos.etcd2.initial_cluster_state {s:?} is not new or existing"),
            );
        }
    }
    let Some((ic, ic_line)) = vals.get("initial_cluster") else {
        return;
    };
    let mut members: Vec<(String, String)> = Vec::new();
    for m in ic.split(',').map(str::trim) {
        match m.split_once('=') {
            Some((name, url)) if !name.is_empty() => {
                check_url_at(
                    c,
                    *ic_line,
                    &format!("coreos.etcd2.initial_cluster: member {name}:"),
                    url,
                );
                members.push((name.to_string(), url.to_string()));
            }
            _ => c.error(
                *ic_line,
                format!("coreos.etcd2.initial_cluster: {m:?} is not NAME=URL"),
            ),
        }
    }
    // Without `name` the member is named after the host (the image's
    // etcd.service drop-in): one user-data serves every host whose name
    // initial_cluster lists, which only the running host can check.
    match vals.get("name") {
        None => {}
        Some((name, line)) => {
            let mine: Vec<&str> = members
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, u)| u.as_str())
                .collect();
            if mine.is_empty() {
                c.error(
                    *line,
                    format!("coreos.etcd2.name {name:?} is not a member of initial_cluster"),
                );
            } else if let Some((adv, aline)) = vals.get("initial_advertise_peer_urls") {
                for u in adv.split(',').map(str::trim) {
                    if !mine.contains(&u) {
                        c.error(*aline, format!("coreos.etcd2.initial_advertise_peer_urls: {u} is not listed for {name} in initial_cluster (etcd would refuse to start)"));
                    }
                }
            }
        }
    }
}

/// CoreOS units the tutorial starts that Nimbus has no unit file for, and
/// what does their work here.
const NOT_SHIPPED: &[(&str, &str)] = &[
    (
        "fleet.service",
        "schedule containers with Docker swarm (nimbus.swarm, docs/cluster.md)",
    ),
    (
        "fleet.socket",
        "schedule containers with Docker swarm (nimbus.swarm, docs/cluster.md)",
    ),
    (
        "flanneld.service",
        "swarm's overlay networks (`docker network create -d overlay`)",
    ),
];

pub(super) fn unit(c: &mut Checker, n: &Node) -> Option<Unit> {
    let mut u = Unit::default();
    let mut named = false;
    let mut name_given = false;
    c.map(n, "units entry", UNIT, |c, key, v| match key {
        "name" => {
            name_given = true;
            if let Some(s) = c.string(v, "units.name") {
                if valid_unit_name(&s) {
                    if NOT_SHIPPED.iter().any(|(n, _)| *n == s) {
                        let why = NOT_SHIPPED.iter().find(|(n, _)| *n == s).map_or("", |(_, w)| w);
                        c.warn(v.line, format!("unit {s} is not shipped with Nimbus (unless `content` gives it): {why}"));
                    }
                    u.name = s;
                    named = true;
                } else {
                    c.error(v.line, format!("unit name {s:?} is not a valid unit name (e.g. foo.service; allowed suffixes: {})", UNIT_SUFFIXES.join(" ")));
                }
            }
        }
        "content" => u.content = c.string(v, "units.content"),
        "enable" => u.enable = c.boolean(v, "units.enable").unwrap_or(false),
        "runtime" => u.runtime = c.boolean(v, "units.runtime").unwrap_or(false),
        "mask" => u.mask = c.boolean(v, "units.mask").unwrap_or(false),
        "command" => {
            if let Some(s) = c.string(v, "units.command") {
                if UNIT_COMMANDS.contains(&s.as_str()) {
                    u.command = Some(s);
                } else {
                    let hint = did_you_mean(&s, UNIT_COMMANDS).map(|x| format!("; did you mean {x:?}?")).unwrap_or_default();
                    c.error(v.line, format!("unit command {s:?} is not one of {}{hint}", UNIT_COMMANDS.join(", ")));
                }
            }
        }
        "drop_ins" => {
            for d in c.list(v, "units.drop_ins") {
                let mut name = None;
                let mut name_given = false;
                let mut content = String::new();
                c.map(d, "drop_ins entry", DROP_IN, |c, key, val| match key {
                    "name" => {
                        name_given = true;
                        if let Some(s) = c.string(val, "drop_ins.name") {
                            if s.ends_with(".conf") && !s.contains('/') && s.len() > 5 {
                                name = Some(s);
                            } else {
                                c.error(val.line, format!("drop-in name {s:?} must be a file name ending in .conf"));
                            }
                        }
                    }
                    "content" => content = c.string(val, "drop_ins.content").unwrap_or_default(),
                    _ => {}
                });
                match name {
                    Some(nm) => u.drop_ins.push((nm, content)),
                    None if !name_given && matches!(d.kind, Kind::Map(_)) => c.error(d.line, "drop_ins entry has no `name`"),
                    None => {}
                }
            }
        }
        _ => {}
    });
    if !named {
        if !name_given && matches!(n.kind, Kind::Map(_)) {
            c.error(n.line, "units entry has no `name`");
        }
        return None;
    }
    if u.mask && (u.content.is_some() || u.enable) {
        c.warn(
            n.line,
            format!("unit {}: mask wins over content/enable", u.name),
        );
    }
    let is_network = NETWORK_SUFFIXES.iter().any(|s| u.name.ends_with(s));
    if is_network && (u.enable || u.mask || u.command.is_some()) {
        c.error(n.line, format!("unit {}: network units take only content (and runtime); enable/mask/command apply to systemd units", u.name));
    }
    Some(u)
}
