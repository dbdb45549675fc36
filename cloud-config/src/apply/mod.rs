//! Apply a checked [`CloudConfig`] to a root directory.
//!
//! Every path is walked inside the root by directory descriptors with
//! chroot semantics (absolute symlink targets are re-rooted, `..` may not
//! climb out), so a hostile or careless symlink cannot make us write
//! outside it; and symlinks are followed only in directories only root can
//! write, so a user cannot point a path we write, chown or read as root at
//! anything of root's (see [`Root::walk`]). Every write is atomic
//! and skipped when the file already has the wanted bytes, mode and owner:
//! applying the same file twice changes nothing the second time.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nimbus::durable;
use nimbus::updateconf::UpdateConf;

use crate::schema::{CloudConfig, Unit, User, NETWORK_SUFFIXES};

mod accounts;
mod root;
mod units;

use accounts::*;
pub use accounts::{merge_keys, KeyMerge};
pub use root::Root;
use units::*;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: resolves outside the root {root} (through symlink {link}); refusing to write"
    )]
    Escapes {
        path: String,
        root: PathBuf,
        link: PathBuf,
    },
    #[error("{path}: too many levels of symbolic links")]
    Loop { path: String },
    #[error("{path}: not following symlink {link} (owned by uid {uid}, or in a directory others can write); refusing")]
    Untrusted {
        path: String,
        link: PathBuf,
        uid: u32,
    },
    #[error("{path}: {component} is not a directory")]
    NotADirectory { path: String, component: PathBuf },
    #[error(transparent)]
    Durable(#[from] durable::DurableError),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What apply did, for the log and for idempotency tests.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub changed: Vec<String>,
    pub unchanged: usize,
    /// Commands run on a live system, or that would have run.
    pub commands: Vec<String>,
    pub errors: Vec<String>,
}

/// Runs systemctl and friends on a live system; tests and `--root` use
/// [`NoCommands`], which records instead.
pub trait CommandRunner {
    fn run(&mut self, argv: &[&str]) -> Result<(), String>;
    fn live(&self) -> bool;
}

pub struct NoCommands;

impl CommandRunner for NoCommands {
    fn run(&mut self, _argv: &[&str]) -> Result<(), String> {
        Ok(())
    }
    fn live(&self) -> bool {
        false
    }
}

pub struct SystemCommands;

impl CommandRunner for SystemCommands {
    fn run(&mut self, argv: &[&str]) -> Result<(), String> {
        let status = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .map_err(|e| format!("{}: {e}", argv[0]))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`{}` failed: {status}", argv.join(" ")))
        }
    }
    fn live(&self) -> bool {
        true
    }
}

/// Apply everything. Problems that concern one item (a group that does not
/// exist, a unit that cannot be enabled) are collected in the report and the
/// rest is still applied; I/O failures and escapes stop at once.
pub fn apply(
    root: &mut Root,
    cfg: &CloudConfig,
    cmds: &mut dyn CommandRunner,
) -> Result<(), ApplyError> {
    if let Some(h) = &cfg.hostname {
        root.write(
            "/etc/hostname",
            format!("{h}\n").as_bytes(),
            0o644,
            Some((0, 0)),
        )?;
        if cmds.live() {
            fs::write("/proc/sys/kernel/hostname", h)
                .map_err(io_err(Path::new("/proc/sys/kernel/hostname")))?;
        }
    }
    if cfg.manage_etc_hosts {
        let host = cfg
            .hostname
            .clone()
            .or_else(|| root.read("/etc/hostname").map(|s| s.trim().to_string()))
            .filter(|h| !h.is_empty());
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if let Some(h) = host {
            let short = h.split('.').next().unwrap_or(&h).to_string();
            let names = if short == h {
                h
            } else {
                format!("{h} {short}")
            };
            hosts.push_str(&format!("127.0.1.1\t{names}\n"));
        }
        root.write("/etc/hosts", hosts.as_bytes(), 0o644, Some((0, 0)))?;
    }
    apply_users(root, cfg)?;
    let acc = Accounts::load(root);
    for f in &cfg.write_files {
        let owner = match &f.owner {
            None => (0, 0),
            Some(o) => {
                let (u, g) = o.split_once(':').unwrap_or((o, ""));
                let uid = acc.uid(u);
                let gid = if g.is_empty() {
                    acc.passwd
                        .find(u)
                        .and_then(|l| l.get(3)?.parse().ok())
                        .or(uid)
                } else {
                    acc.gid(g)
                };
                match (uid, gid) {
                    (Some(uid), Some(gid)) => (uid, gid),
                    _ => {
                        root.report.errors.push(format!(
                            "write_files {}: owner {o:?} does not exist",
                            f.path
                        ));
                        continue;
                    }
                }
            }
        };
        root.write(&f.path, &f.content, f.permissions, Some(owner))?;
    }
    if !cfg.oem.is_empty() {
        let body: String = cfg
            .oem
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}=\"{}\"\n",
                    k.to_ascii_uppercase(),
                    v.replace('"', "\\\"")
                )
            })
            .collect();
        root.write("/etc/oem-release", body.as_bytes(), 0o644, Some((0, 0)))?;
    }
    apply_update_conf(root, cfg)?;
    let mut swarm_changed = false;
    if let Some(sw) = cfg.nimbus.as_ref().and_then(|n| n.swarm.as_ref()) {
        let before = root.report.changed.len();
        // 0600: it may hold a join token, which lets a machine into the swarm.
        root.write(
            &format!("/{}", nimbus::paths::SWARM_CONF),
            sw.render().as_bytes(),
            0o600,
            Some((0, 0)),
        )?;
        swarm_changed = root.report.changed.len() > before;
    }
    let units_changed = apply_units(root, cfg)?;

    let mut argvs: Vec<Vec<String>> = Vec::new();
    if units_changed {
        argvs.push(vec!["systemctl".into(), "daemon-reload".into()]);
    }
    if cfg
        .units
        .iter()
        .any(|u| NETWORK_SUFFIXES.iter().any(|s| u.name.ends_with(s)))
        && units_changed
    {
        argvs.push(vec![
            "systemctl".into(),
            "try-restart".into(),
            "systemd-networkd.service".into(),
        ]);
    }
    for u in &cfg.units {
        if let Some(c) = &u.command {
            // Queued, not waited for, as coreos-cloudinit's D-Bus StartUnit
            // did: at boot, cloud-config.service runs before the daemons a
            // unit may need (docker after containerd after cloud-config), and
            // waiting here would deadlock the boot until a timeout.
            argvs.push(vec![
                "systemctl".into(),
                "--no-block".into(),
                c.clone(),
                u.name.clone(),
            ]);
        }
    }
    if units::wants_local_etcd(cfg) {
        // The link above is only read by the next daemon-reload's
        // transaction; the boot's was computed before cloud-config ran.
        // Queued, as for units: etcd starts after cloud-config.service.
        argvs.push(vec![
            "systemctl".into(),
            "start".into(),
            "--no-block".into(),
            nimbus::units::ETCD.into(),
        ]);
    }
    if swarm_changed {
        // At boot it starts after cloud-config anyway; on a running host
        // the new membership takes effect now. --no-block: joining waits
        // for Docker and etcd, which may still be starting.
        argvs.push(vec![
            "systemctl".into(),
            "start".into(),
            "--no-block".into(),
            "nimbus-swarm.service".into(),
        ]);
        // The promoter reads MANAGERS once, at its start; on a host that
        // had no swarm.conf at boot (user-data applied later, as Vagrant's
        // provisioner does) it is not running yet: restart starts it.
        argvs.push(vec![
            "systemctl".into(),
            "restart".into(),
            "--no-block".into(),
            "nimbus-swarm-promote.service".into(),
        ]);
    }
    for argv in argvs {
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let line = argv.join(" ");
        if cmds.live() {
            if let Err(e) = cmds.run(&refs) {
                root.report.errors.push(e);
            }
            root.report.commands.push(line);
        } else {
            root.report
                .commands
                .push(format!("{line} (skipped: not a live system)"));
        }
    }
    Ok(())
}

/// A `#!` user-data script: stored, then run once as a transient unit.
pub fn apply_script(
    root: &mut Root,
    script: &[u8],
    cmds: &mut dyn CommandRunner,
) -> Result<(), ApplyError> {
    use sha2::Digest;
    let id = hex::encode(&sha2::Sha256::digest(script)[..6]);
    let path = "/var/lib/nimbus/cloud-config/user-script";
    root.write(path, script, 0o700, Some((0, 0)))?;
    let unit = format!("--unit=cloud-config-script-{id}");
    let argv = [
        "systemd-run",
        &unit,
        "--collect",
        "--service-type=oneshot",
        "--wait",
        path,
    ];
    if cmds.live() {
        if let Err(e) = cmds.run(&argv) {
            root.report.errors.push(e);
        }
        root.report.commands.push(argv.join(" "));
    } else {
        root.report
            .commands
            .push(format!("{} (skipped: not a live system)", argv.join(" ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::merge_keys;

    fn src(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn vagrant_replaces_the_insecure_key_for_good() {
        let s = src(&[("cloud-config", "ssh-rsa INSECURE vagrant\n")]);
        // First boot: nothing there yet.
        let m1 = merge_keys(&s, None, None, "");
        assert_eq!(
            m1.authorized_keys,
            "# cloud-config\nssh-rsa INSECURE vagrant\n"
        );
        // Vagrant appends its key and deletes the insecure one.
        let edited = "# cloud-config\nssh-ed25519 OWN vagrant\n";
        let m2 = merge_keys(&s, Some(edited), Some(&m1.authorized_keys), "");
        assert_eq!(m2.added, vec!["ssh-ed25519 OWN vagrant"]);
        assert_eq!(m2.removed, vec!["ssh-rsa INSECURE vagrant"]);
        assert_eq!(
            m2.authorized_keys,
            "# cloud-config\n# local\nssh-ed25519 OWN vagrant\n"
        );
        // Next boot: the OEM user-data still names the insecure key; it stays out.
        let s3 = src(&[
            ("cloud-config", "ssh-rsa INSECURE vagrant\n"),
            ("local", "ssh-ed25519 OWN vagrant\n"),
        ]);
        let removed = m2.removed.join("\n") + "\n";
        let m3 = merge_keys(
            &s3,
            Some(&m2.authorized_keys),
            Some(&m2.authorized_keys),
            &removed,
        );
        assert_eq!(m3.authorized_keys, m2.authorized_keys);
        assert!(m3.added.is_empty());
        assert_eq!(m3.removed, m2.removed);
    }

    #[test]
    fn a_key_added_back_by_hand_is_no_longer_removed_and_duplicates_collapse() {
        let s = src(&[("a", "k1\nk2\n"), ("b", "k2\n")]);
        let m = merge_keys(&s, Some("k1\nk2\n"), Some("k1\n"), "k2\n");
        assert!(m.removed.is_empty(), "{m:?}");
        assert_eq!(m.authorized_keys, "# a\nk1\nk2\n# b\n# local\n");
        // A file that existed before cloud-config managed it: all its keys are the user's.
        let m = merge_keys(&src(&[("cloud-config", "k1\n")]), Some("mine\n"), None, "");
        assert_eq!(m.added, vec!["mine"]);
        assert!(m.authorized_keys.contains("mine") && m.authorized_keys.contains("k1"));
    }
}
