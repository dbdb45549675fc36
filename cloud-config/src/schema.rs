//! The coreos-cloudinit `#cloud-config` schema, checked node by node so that
//! every problem is reported with its line, and turned into a typed
//! [`CloudConfig`] when there are no errors.
//!
//! Keys may use `-` or `_` (coreos-cloudinit normalised dashes). Unknown and
//! misplaced keys are errors: coreos-cloudinit ignored them silently
//! (coreos-cloudinit#90, coreos/bugs#199), which let typos through.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use crate::yaml::{self, Kind, Node};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "line {}: {sev}: {}", self.line, self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudConfig {
    pub hostname: Option<String>,
    pub ssh_authorized_keys: Vec<String>,
    pub users: Vec<User>,
    pub write_files: Vec<WriteFile>,
    pub manage_etc_hosts: bool,
    pub update: Option<Update>,
    pub locksmith: Option<Locksmith>,
    pub oem: Vec<(String, String)>,
    /// Environment drop-ins for etcd, fleet, flannel.
    pub env_dropins: Vec<EnvDropIn>,
    pub units: Vec<Unit>,
    /// The `nimbus:` section: Nimbus's own keys.
    pub nimbus: Option<NimbusSection>,
}

/// `nimbus:` at the top level.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NimbusSection {
    pub swarm: Option<Swarm>,
    /// update.conf's HOOK_TIMEOUT: how long each update hook may run.
    pub hook_timeout: Option<String>,
}

/// `nimbus.swarm`: this host's place in a Docker swarm. One manager has
/// `init`; the others `join` the managers listed, with `join_token` or
/// the token the init host published in etcd. Rendered as nimbus-swarm
/// reads it by the contract's own `render`.
pub use nimbus::swarmconf::SwarmConf as Swarm;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    pub name: String,
    pub passwd: Option<String>,
    pub gecos: Option<String>,
    pub homedir: Option<String>,
    pub no_create_home: bool,
    pub primary_group: Option<String>,
    pub groups: Vec<String>,
    pub shell: Option<String>,
    pub system: bool,
    pub no_user_group: bool,
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFile {
    pub path: String,
    /// Decoded.
    pub content: Vec<u8>,
    pub owner: Option<String>,
    pub permissions: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub reboot_strategy: Option<nimbus::updateconf::RebootStrategy>,
    pub server: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Locksmith {
    pub endpoint: Option<String>,
    pub etcd_cafile: Option<String>,
    pub etcd_certfile: Option<String>,
    pub etcd_keyfile: Option<String>,
    pub group: Option<String>,
    pub window_start: Option<String>,
    pub window_length: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvDropIn {
    pub unit: &'static str,
    /// (VARIABLE, value), in file order.
    pub vars: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unit {
    pub name: String,
    pub content: Option<String>,
    pub enable: bool,
    pub runtime: bool,
    pub mask: bool,
    pub command: Option<String>,
    pub drop_ins: Vec<(String, String)>,
}

/// What a user-data file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserData {
    CloudConfig(Box<CloudConfig>),
    /// A `#!` script, run once as a transient unit at apply time.
    Script(Vec<u8>),
    /// Empty or whitespace only: nothing to do.
    Empty,
}

pub const UNIT_COMMANDS: &[&str] = &[
    "start",
    "stop",
    "restart",
    "reload",
    "try-restart",
    "reload-or-restart",
    "reload-or-try-restart",
];

const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".mount",
    ".automount",
    ".path",
    ".slice",
    ".swap",
    ".device",
    ".scope",
    ".network",
    ".netdev",
    ".link",
];

pub const NETWORK_SUFFIXES: &[&str] = &[".network", ".netdev", ".link"];

const ENCODINGS: &[&str] = &[
    "",
    "b64",
    "base64",
    "gz",
    "gzip",
    "gz+b64",
    "gz+base64",
    "gzip+b64",
    "gzip+base64",
];

const TOP: &[&str] = &[
    "hostname",
    "ssh_authorized_keys",
    "users",
    "write_files",
    "manage_etc_hosts",
    "coreos",
    "nimbus",
];
const NIMBUS: &[&str] = &["swarm", "hook_timeout"];
const SWARM: &[&str] = &[
    "role",
    "init",
    "advertise_addr",
    "listen_addr",
    "join",
    "join_token",
];
const COREOS: &[&str] = &[
    "etcd",
    "etcd2",
    "fleet",
    "flannel",
    "locksmith",
    "update",
    "oem",
    "units",
];
const USER: &[&str] = &[
    "name",
    "passwd",
    "gecos",
    "homedir",
    "no_create_home",
    "primary_group",
    "groups",
    "no_user_group",
    "ssh_authorized_keys",
    "coreos_ssh_import_github",
    "coreos_ssh_import_github_users",
    "coreos_ssh_import_url",
    "system",
    "no_log_init",
    "shell",
];
const WRITE_FILE: &[&str] = &["path", "content", "encoding", "owner", "permissions"];
const UNIT: &[&str] = &[
    "name", "content", "enable", "runtime", "mask", "command", "drop_ins",
];
const DROP_IN: &[&str] = &["name", "content"];
const UPDATE: &[&str] = &["reboot_strategy", "server", "group"];
const LOCKSMITH: &[&str] = &[
    "endpoint",
    "etcd_cafile",
    "etcd_certfile",
    "etcd_keyfile",
    "group",
    "window_start",
    "window_length",
];
const OEM: &[&str] = &["id", "name", "version_id", "home_url", "bug_report_url"];
const ETCD2: &[&str] = &[
    "advertise_client_urls",
    "ca_file",
    "cert_file",
    "client_cert_auth",
    "cors",
    "data_dir",
    "debug",
    "discovery",
    "discovery_fallback",
    "discovery_proxy",
    "discovery_srv",
    "election_timeout",
    "enable_pprof",
    "force_new_cluster",
    "heartbeat_interval",
    "initial_advertise_peer_urls",
    "initial_cluster",
    "initial_cluster_state",
    "initial_cluster_token",
    "key_file",
    "listen_client_urls",
    "listen_peer_urls",
    "log_package_levels",
    "max_snapshots",
    "max_wals",
    "name",
    "peer_ca_file",
    "peer_cert_file",
    "peer_client_cert_auth",
    "peer_key_file",
    "peer_trusted_ca_file",
    "proxy",
    "proxy_dial_timeout",
    "proxy_failure_wait",
    "proxy_read_timeout",
    "proxy_refresh_interval",
    "proxy_write_timeout",
    "snapshot_count",
    "strict_reconfig_check",
    "trusted_ca_file",
    "wal_dir",
];
const ETCD: &[&str] = &[
    "addr",
    "bind_addr",
    "ca_file",
    "cert_file",
    "cluster_active_size",
    "cluster_remove_delay",
    "cluster_sync_interval",
    "cors",
    "data_dir",
    "discovery",
    "graphite_host",
    "http_read_timeout",
    "http_write_timeout",
    "key_file",
    "max_cluster_size",
    "max_result_buffer",
    "max_retry_attempts",
    "name",
    "peer_addr",
    "peer_bind_addr",
    "peer_ca_file",
    "peer_cert_file",
    "peer_election_timeout",
    "peer_heartbeat_interval",
    "peer_key_file",
    "peers",
    "peers_file",
    "retry_interval",
    "snapshot",
    "snapshot_count",
    "strtrace",
    "verbose",
    "very_verbose",
];
const FLEET: &[&str] = &[
    "agent_ttl",
    "authorized_keys_file",
    "disable_engine",
    "disable_watches",
    "enable_grpc",
    "engine_reconcile_interval",
    "etcd_cafile",
    "etcd_certfile",
    "etcd_key_prefix",
    "etcd_keyfile",
    "etcd_request_timeout",
    "etcd_servers",
    "metadata",
    "public_ip",
    "token_limit",
    "verbosity",
    "verify_units",
];
const FLANNEL: &[&str] = &[
    "etcd_cafile",
    "etcd_certfile",
    "etcd_endpoints",
    "etcd_keyfile",
    "etcd_password",
    "etcd_prefix",
    "etcd_username",
    "interface",
    "ip_masq",
    "kube_subnet_mgr",
    "public_ip",
    "remote",
    "remote_cafile",
    "remote_certfile",
    "remote_keyfile",
    "subnet_file",
];

/// Keys that are valid somewhere else: a better message than "unknown".
fn home_of(key: &str, here: &str) -> Option<&'static str> {
    if here != "top level" && TOP.contains(&key) {
        return Some("the top level");
    }
    if here != "coreos" && COREOS.contains(&key) {
        return Some("`coreos`");
    }
    None
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

pub fn did_you_mean<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

/// Collects problems while walking.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    /// Line of the key whose value is being checked, for messages about the
    /// key itself (deprecated, conflicting).
    key_line: usize,
}

impl Checker {
    fn error(&mut self, line: usize, msg: impl Into<String>) {
        self.problems.push(Problem {
            line,
            severity: Severity::Error,
            message: msg.into(),
        });
    }
    fn warn(&mut self, line: usize, msg: impl Into<String>) {
        self.problems.push(Problem {
            line,
            severity: Severity::Warning,
            message: msg.into(),
        });
    }

    /// Walk a mapping with a fixed key set. Calls `f(normalised_key, value)`
    /// for each known key whose value is not null.
    fn map<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
        mut f: impl FnMut(&mut Self, &str, &'n Node),
    ) {
        let Kind::Map(entries) = &node.kind else {
            if !node.is_null() {
                self.error(
                    node.line,
                    format!("{what} must be a mapping, found {}", node.type_name()),
                );
            }
            return;
        };
        let mut seen: Vec<String> = Vec::new();
        for (k, v) in entries {
            let Some(raw) = k.as_str() else {
                self.error(
                    k.line,
                    format!("a key in {what} must be a string, found {}", k.type_name()),
                );
                continue;
            };
            let key = raw.replace('-', "_");
            if seen.contains(&key) {
                self.error(k.line, format!("duplicate key `{raw}` in {what}"));
                continue;
            }
            seen.push(key.clone());
            if known.contains(&key.as_str()) {
                if !v.is_null() {
                    self.key_line = k.line;
                    f(self, &key, v);
                }
            } else if let Some(home) = home_of(&key, what) {
                self.error(
                    k.line,
                    format!("key `{raw}` is misplaced in {what}: it belongs under {home}"),
                );
            } else {
                let hint = did_you_mean(&key, known)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.error(k.line, format!("unknown key `{raw}` in {what}{hint}"));
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar { value, .. } => Some(value.clone()),
            _ => {
                self.error(
                    node.line,
                    format!("{what} must be a string, found {}", node.type_name()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        // YAML 1.1 booleans, as old CoreOS files use them, when unquoted.
        if let Kind::Scalar { value, plain: true } = &node.kind {
            match value.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "y" => return Some(true),
                "false" | "no" | "off" | "n" => return Some(false),
                _ => {}
            }
        }
        let found = match &node.kind {
            Kind::Scalar { value, .. } => format!("{value:?}"),
            _ => node.type_name().to_string(),
        };
        self.error(
            node.line,
            format!("{what} must be true or false, found {found}"),
        );
        None
    }

    fn strings(&mut self, node: &Node, what: &str) -> Vec<String> {
        match &node.kind {
            Kind::Seq(items) => items
                .iter()
                .filter_map(|i| self.string(i, &format!("each entry of {what}")))
                .collect(),
            _ => {
                self.error(
                    node.line,
                    format!("{what} must be a list, found {}", node.type_name()),
                );
                Vec::new()
            }
        }
    }

    fn list<'n>(&mut self, node: &'n Node, what: &str) -> &'n [Node] {
        match &node.kind {
            Kind::Seq(items) => items,
            _ => {
                self.error(
                    node.line,
                    format!("{what} must be a list, found {}", node.type_name()),
                );
                &[]
            }
        }
    }
}

pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

pub fn valid_user_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && n.len() <= 32
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

pub fn valid_unit_name(n: &str) -> bool {
    UNIT_SUFFIXES
        .iter()
        .any(|s| n.len() > s.len() && n.ends_with(s))
        && !n.contains('/')
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":-_.\\@".contains(&c))
}

/// Why an absolute path may not be written, if it may not.
pub fn path_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some(format!("path {p:?} must be absolute"));
    }
    if p.split('/').any(|c| c == "..") {
        return Some(format!("path {p:?} contains `..`"));
    }
    if p.contains('\0') {
        return Some("path contains a NUL byte".into());
    }
    let norm: String = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/");
    if norm == "usr" || norm.starts_with("usr/") {
        return Some(format!(
            "path {p:?} is under /usr, which is read-only on Nimbus (dm-verity)"
        ));
    }
    if norm.is_empty() {
        return Some("path is the root directory".into());
    }
    None
}

/// Decode write_files content.
pub fn decode(content: &str, encoding: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let e = encoding.to_ascii_lowercase();
    let b64 = e.ends_with("b64") || e.ends_with("base64");
    let gz = e.starts_with("gz");
    let mut data = if b64 {
        let compact: String = content.chars().filter(|c| !c.is_whitespace()).collect();
        B64.decode(compact)
            .map_err(|err| format!("content is not valid base64: {err}"))?
    } else {
        content.as_bytes().to_vec()
    };
    if gz {
        let mut out = Vec::new();
        // Cap what a small gzip may expand to: a decompression bomb must not
        // fill the disk.
        flate2::read::GzDecoder::new(&data[..])
            .take(64 * 1024 * 1024 + 1)
            .read_to_end(&mut out)
            .map_err(|err| format!("content is not valid gzip: {err}"))?;
        if out.len() > 64 * 1024 * 1024 {
            return Err("gzip content expands to more than 64 MiB".into());
        }
        data = out;
    }
    Ok(data)
}

fn parse_mode(raw: &str) -> Option<u32> {
    let t = raw.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    if t.is_empty() || t.len() > 5 || !t.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
        return None;
    }
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o7777)
}

fn owner_ok(o: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    };
    match o.split_once(':') {
        Some((u, g)) => ok(u) && ok(g),
        None => ok(o),
    }
}

fn check_url(c: &mut Checker, node: &Node, what: &str, s: &str) {
    check_url_at(c, node.line, what, s)
}

fn check_url_at(c: &mut Checker, line: usize, what: &str, s: &str) {
    if !(s.starts_with("http://") || s.starts_with("https://")) || s.contains(char::is_whitespace) {
        c.error(line, format!("{what} {s:?} is not an http(s) URL"));
    }
}

/// Parse and check a whole user-data file.
pub fn check(text: &str) -> (Option<UserData>, Vec<Problem>) {
    let mut c = Checker::default();
    let out = check_inner(text, &mut c);
    let has_error = c.problems.iter().any(|p| p.severity == Severity::Error);
    c.problems.sort_by_key(|p| (p.line, p.severity));
    (if has_error { None } else { out }, c.problems)
}

fn check_inner(text: &str, c: &mut Checker) -> Option<UserData> {
    if text.trim().is_empty() {
        return Some(UserData::Empty);
    }
    if text.starts_with("#!") {
        return Some(UserData::Script(text.as_bytes().to_vec()));
    }
    let first = text.lines().next().unwrap_or("");
    if first.trim_end() != "#cloud-config" {
        c.error(1, "missing `#cloud-config` header: the first line must be exactly `#cloud-config` (or `#!` for a script)");
        return None;
    }
    let root = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            c.error(e.line(), e.to_string());
            return None;
        }
    };
    let mut cfg = CloudConfig::default();
    c.map(&root, "top level", TOP, |c, key, v| match key {
        "hostname" => {
            if let Some(h) = c.string(v, "hostname") {
                if valid_hostname(&h) {
                    cfg.hostname = Some(h);
                } else {
                    c.error(
                        v.line,
                        format!("hostname {h:?} is not a valid host name (RFC 1123)"),
                    );
                }
            }
        }
        "ssh_authorized_keys" => cfg.ssh_authorized_keys = ssh_keys(c, v, "ssh_authorized_keys"),
        "manage_etc_hosts" => {
            if let Some(s) = c.string(v, "manage_etc_hosts") {
                match s.as_str() {
                    "localhost" => cfg.manage_etc_hosts = true,
                    "" => {}
                    other => c.error(
                        v.line,
                        format!("manage_etc_hosts must be \"localhost\", found {other:?}"),
                    ),
                }
            }
        }
        "users" => {
            for u in c.list(v, "users") {
                if let Some(user) = user(c, u) {
                    cfg.users.push(user);
                }
            }
        }
        "write_files" => {
            for f in c.list(v, "write_files") {
                if let Some(wf) = write_file(c, f) {
                    cfg.write_files.push(wf);
                }
            }
        }
        "coreos" => coreos(c, v, &mut cfg),
        "nimbus" => cfg.nimbus = Some(nimbus_section(c, v)),
        _ => {}
    });
    let mut paths: Vec<&str> = Vec::new();
    for f in &cfg.write_files {
        if paths.contains(&f.path.as_str()) {
            c.warn(
                root.line,
                format!(
                    "write_files: {} is written more than once; the last entry wins",
                    f.path
                ),
            );
        }
        paths.push(&f.path);
    }
    Some(UserData::CloudConfig(Box::new(cfg)))
}

fn ssh_keys(c: &mut Checker, v: &Node, what: &str) -> Vec<String> {
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

fn truncate(s: &str) -> String {
    s.chars().take(30).collect()
}

fn user(c: &mut Checker, n: &Node) -> Option<User> {
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
fn account_field(c: &mut Checker, v: &Node, key: &str) -> Option<String> {
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

fn write_file(c: &mut Checker, n: &Node) -> Option<WriteFile> {
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

fn env_section(
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

fn coreos(c: &mut Checker, n: &Node, cfg: &mut CloudConfig) {
    let mut etcd_line = None;
    c.map(n, "coreos", COREOS, |c, key, v| match key {
        "etcd2" => {
            let kl = c.key_line;
            if let Some(l) = etcd_line {
                c.error(kl, format!("coreos.etcd2 and coreos.etcd (line {l}) both configure etcd.service; keep only etcd2"));
            }
            etcd_line = Some(kl);
            cfg.env_dropins.push(env_section(c, v, "etcd2", ETCD2, "ETCD_", "etcd.service"));
            etcd2_checks(c, v);
        }
        "etcd" => {
            let kl = c.key_line;
            if let Some(l) = etcd_line {
                c.error(kl, format!("coreos.etcd and coreos.etcd2 (line {l}) both configure etcd.service; keep only etcd2"));
            }
            etcd_line = Some(kl);
            c.warn(kl, "coreos.etcd configures etcd 0.4 and is deprecated; use coreos.etcd2 (Nimbus runs etcd 3 from Debian as etcd.service)");
            cfg.env_dropins.push(env_section(c, v, "etcd", ETCD, "ETCD_", "etcd.service"));
        }
        "fleet" => {
            c.warn(c.key_line, "coreos.fleet is deprecated: fleet is not shipped with Nimbus; the drop-in is written but nothing reads it");
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

/// An address swarm accepts: an IP, an IP:port, or an interface name.
fn swarm_addr_ok(s: &str, port_allowed: bool) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    if port_allowed && s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    // An interface name (eth1, ens4): swarm takes its address.
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && !s.contains('.')
}

fn nimbus_section(c: &mut Checker, n: &Node) -> NimbusSection {
    let mut out = NimbusSection::default();
    c.map(n, "nimbus", NIMBUS, |c, key, v| match key {
        "hook_timeout" => {
            if let Some(s) = c.string(v, "nimbus.hook_timeout") {
                match nimbus::updateconf::parse_duration(&s) {
                    Ok(0) => c.error(v.line, "nimbus.hook_timeout must be more than 0"),
                    Ok(_) => out.hook_timeout = Some(s),
                    Err(e) => c.error(v.line, format!("nimbus.hook_timeout {e}")),
                }
            }
        }
        "swarm" => {
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
                "init" => sw.init = c.boolean(val, "nimbus.swarm.init").unwrap_or(false),
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
                _ => {}
            });
            if ok && matches!(v.kind, Kind::Map(_)) {
                sw.role = role.unwrap_or_default();
                if role.is_none() {
                    c.error(kl, "nimbus.swarm needs `role` (manager or worker)");
                } else if sw.advertise_addr.is_empty() {
                    c.error(kl, "nimbus.swarm needs `advertise_addr`: the address other hosts reach this one at");
                } else if sw.init && !sw.manager() {
                    c.error(kl, "nimbus.swarm: only a manager can `init` a swarm");
                } else if sw.init && (!sw.join.is_empty() || sw.join_token.is_some()) {
                    c.error(kl, "nimbus.swarm: `init` starts a new swarm; it does not go with `join` or `join_token`");
                } else if !sw.init && sw.join.is_empty() {
                    c.error(kl, "nimbus.swarm: give `join` (the managers' addresses), or `init: true` on the one host that starts the swarm");
                } else {
                    out.swarm = Some(sw);
                }
            }
        }
        _ => {}
    });
    out
}

const ETCD2_URL_LISTS: &[&str] = &[
    "advertise_client_urls",
    "initial_advertise_peer_urls",
    "listen_client_urls",
    "listen_peer_urls",
];

/// etcd refuses to start on these mistakes, late and in its own log: say
/// so while validating, with the line.
fn etcd2_checks(c: &mut Checker, n: &Node) {
    let Kind::Map(entries) = &n.kind else { return };
    let mut vals: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for (k, v) in entries {
        if let (Some(k), Kind::Scalar { value, .. }) = (k.as_str(), &v.kind) {
            vals.insert(k.replace('-', "_"), (value.clone(), v.line));
        }
    }
    for (k, (v, line)) in &vals {
        if v.contains("$private_ipv4") || v.contains("$public_ipv4") {
            c.error(*line, format!("coreos.etcd2.{k}: Nimbus does not substitute $private_ipv4/$public_ipv4 (it has no metadata service); write the address"));
            continue;
        }
        if ETCD2_URL_LISTS.contains(&k.as_str()) {
            for u in v.split(',') {
                check_url_at(c, *line, &format!("coreos.etcd2.{k}:"), u.trim());
            }
        }
    }
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
    match vals.get("name") {
        None => c.error(*ic_line, "coreos.etcd2: initial_cluster is given but not `name` (which of its members this host is)"),
        Some((name, line)) => {
            let mine: Vec<&str> = members.iter().filter(|(n, _)| n == name).map(|(_, u)| u.as_str()).collect();
            if mine.is_empty() {
                c.error(*line, format!("coreos.etcd2.name {name:?} is not a member of initial_cluster"));
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

fn unit(c: &mut Checker, n: &Node) -> Option<Unit> {
    let mut u = Unit::default();
    let mut named = false;
    let mut name_given = false;
    c.map(n, "units entry", UNIT, |c, key, v| match key {
        "name" => {
            name_given = true;
            if let Some(s) = c.string(v, "units.name") {
                if valid_unit_name(&s) {
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
