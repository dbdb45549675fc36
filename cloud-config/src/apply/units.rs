//! Units (written, enabled by their `[Install]` section, started on a live
//! system) and update.conf from `coreos.update` and `nimbus`.

use super::*;

pub(super) fn unit_dirs(u: &Unit) -> &'static str {
    let network = NETWORK_SUFFIXES.iter().any(|s| u.name.ends_with(s));
    match (network, u.runtime) {
        (true, false) => "/etc/systemd/network",
        (true, true) => "/run/systemd/network",
        (false, false) => "/etc/systemd/system",
        (false, true) => "/run/systemd/system",
    }
}

/// `foo@bar.service` is installed from `foo@.service`.
pub(super) fn template_of(name: &str) -> Option<String> {
    let (prefix, rest) = name.split_once('@')?;
    let dot = rest.rfind('.')?;
    if dot == 0 {
        return None;
    }
    Some(format!("{prefix}@{}", &rest[dot..]))
}

pub(super) use nimbus::units::install_targets;

pub(super) fn find_unit_file(root: &Root, name: &str, dir: &str) -> Option<(String, String)> {
    let file = template_of(name).unwrap_or_else(|| name.to_string());
    for d in [
        dir,
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ] {
        let p = format!("{d}/{file}");
        if let Some(c) = root.read(&p) {
            return Some((p, c));
        }
    }
    None
}

pub(super) fn apply_units(root: &mut Root, cfg: &CloudConfig) -> Result<bool, ApplyError> {
    let before = root.report.changed.len();
    for u in &cfg.units {
        let dir = unit_dirs(u);
        let path = format!("{dir}/{}", u.name);
        if u.mask {
            root.symlink(&path, "/dev/null")?;
        } else if let Some(content) = &u.content {
            root.write(&path, content.as_bytes(), 0o644, Some((0, 0)))?;
        }
        for (name, content) in &u.drop_ins {
            root.write(
                &format!("{dir}/{}.d/{name}", u.name),
                content.as_bytes(),
                0o644,
                Some((0, 0)),
            )?;
        }
        if u.enable && !u.mask {
            let Some((file_path, content)) = find_unit_file(root, &u.name, dir) else {
                root.report.errors.push(format!(
                    "unit {}: cannot enable: no unit file (give `content`)",
                    u.name
                ));
                continue;
            };
            let targets = install_targets(&content);
            if targets.is_empty() {
                root.report.errors.push(format!(
                    "unit {}: cannot enable: {file_path} has no WantedBy=/RequiredBy= in [Install]",
                    u.name
                ));
                continue;
            }
            let link_dir = if u.runtime {
                "/run/systemd/system"
            } else {
                "/etc/systemd/system"
            };
            for (target, kind) in targets {
                root.symlink(&format!("{link_dir}/{target}{kind}/{}", u.name), &file_path)?;
            }
        }
    }
    for d in &cfg.env_dropins {
        let mut body = String::from("[Service]\n");
        for (k, v) in &d.vars {
            let esc = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%");
            body.push_str(&format!("Environment=\"{k}={esc}\"\n"));
        }
        root.write(
            &format!("/run/systemd/system/{}.d/20-cloudinit.conf", d.unit),
            body.as_bytes(),
            0o644,
            Some((0, 0)),
        )?;
    }
    if wants_local_etcd(cfg) {
        // Enabled for this boot only (/run): etcd runs while the config asks
        // for it, and stops being wanted the boot after it no longer does.
        root.symlink(
            &format!(
                "/run/systemd/system/multi-user.target.wants/{}",
                nimbus::units::ETCD
            ),
            nimbus::units::ETCD_FILE,
        )?;
    }
    Ok(root.report.changed.len() > before)
}

/// Whether this host must run etcd: the config configures it (`coreos.etcd2`
/// or `coreos.etcd`), or update-engine is to take its reboot lock from an
/// etcd on this host (`etcd-lock` with no endpoint, or only loopback ones).
/// Without either, etcd stays off and costs nothing (docs/cluster.md).
pub(super) fn wants_local_etcd(cfg: &CloudConfig) -> bool {
    if cfg
        .env_dropins
        .iter()
        .any(|d| d.unit == nimbus::units::ETCD)
    {
        return true;
    }
    let etcd_lock = cfg.update.as_ref().and_then(|u| u.reboot_strategy)
        == Some(nimbus::updateconf::RebootStrategy::EtcdLock);
    let endpoint = cfg.locksmith.as_ref().and_then(|l| l.endpoint.as_deref());
    etcd_lock && endpoint.is_none_or(|e| e.split(',').all(is_loopback_url))
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url.trim();
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn apply_update_conf(root: &mut Root, cfg: &CloudConfig) -> Result<(), ApplyError> {
    let mut set: BTreeMap<&str, String> = BTreeMap::new();
    if let Some(u) = &cfg.update {
        if let Some(v) = &u.group {
            set.insert("GROUP", v.clone());
        }
        if let Some(v) = &u.server {
            set.insert("SERVER", v.clone());
        }
        if let Some(v) = u.reboot_strategy {
            set.insert("REBOOT_STRATEGY", v.name().to_string());
        }
    }
    if let Some(t) = cfg.nimbus.as_ref().and_then(|n| n.hook_timeout.as_ref()) {
        set.insert("HOOK_TIMEOUT", t.clone());
    }
    if let Some(l) = &cfg.locksmith {
        for (k, v) in [
            ("REBOOT_WINDOW_START", &l.window_start),
            ("REBOOT_WINDOW_LENGTH", &l.window_length),
            ("ETCD_ENDPOINTS", &l.endpoint),
            ("ETCD_CAFILE", &l.etcd_cafile),
            ("ETCD_CERTFILE", &l.etcd_certfile),
            ("ETCD_KEYFILE", &l.etcd_keyfile),
            ("REBOOT_GROUP", &l.group),
            ("FLEETLOCK_URL", &l.fleetlock_url),
            ("FLEETLOCK_GROUP", &l.fleetlock_group),
        ] {
            if let Some(v) = v {
                set.insert(k, v.clone());
            }
        }
    }
    if set.is_empty() {
        return Ok(());
    }
    let path = format!("/{}", nimbus::updateconf::ETC_PATH);
    let mut conf = match root.read(&path) {
        Some(text) => UpdateConf::parse(&text).map_err(|e| ApplyError::Invalid {
            what: path.clone(),
            reason: e.to_string(),
        })?,
        None => UpdateConf::default(),
    };
    for (k, v) in set {
        // Quote values with spaces ("Thu 04:00") so the file stays
        // shell-sourceable, as Flatcar's is.
        let v = if v.contains(char::is_whitespace) {
            format!("\"{v}\"")
        } else {
            v
        };
        conf.set(k, &v);
    }
    // Keep the mode of the file replaced (0600 when it holds a password);
    // a new file holding a credential is 0600.
    let mode = root
        .file_mode(&path)
        .unwrap_or_else(|| conf.new_file_mode());
    root.write(&path, conf.render().as_bytes(), mode, Some((0, 0)))
}

#[cfg(test)]
mod tests {
    use super::wants_local_etcd;

    fn wants(doc: &str) -> bool {
        let (ud, problems) = crate::schema::check(doc);
        assert!(
            problems
                .iter()
                .all(|p| p.severity != crate::schema::Severity::Error),
            "{doc}: {problems:?}"
        );
        match ud {
            Some(crate::schema::UserData::CloudConfig(c)) => wants_local_etcd(&c),
            _ => panic!("{doc}: not a cloud-config"),
        }
    }

    #[test]
    fn etcd_is_wanted_only_where_configured_or_locked_on_this_host() {
        for (doc, want) in [
            ("#cloud-config\nhostname: a\n", false),
            ("#cloud-config\ncoreos:\n  etcd2:\n    name: a\n", true),
            ("#cloud-config\ncoreos:\n  update:\n    reboot-strategy: reboot\n", false),
            ("#cloud-config\ncoreos:\n  update:\n    reboot-strategy: etcd-lock\n", true),
            (
                "#cloud-config\ncoreos:\n  update:\n    reboot-strategy: etcd-lock\n  locksmith:\n    endpoint: http://127.0.0.1:2379,http://[::1]:2379,http://localhost:2379\n",
                true,
            ),
            (
                "#cloud-config\ncoreos:\n  update:\n    reboot-strategy: etcd-lock\n  locksmith:\n    endpoint: http://10.0.0.1:2379\n",
                false,
            ),
            (
                "#cloud-config\ncoreos:\n  update:\n    reboot-strategy: etcd-lock\n  locksmith:\n    endpoint: http://127.0.0.1:2379,https://etcd.example.com:2379\n",
                false,
            ),
        ] {
            assert_eq!(wants(doc), want, "{doc}");
        }
    }
}
