//! The states the ESP can be in when mark-good (or update-engine's retry)
//! blesses a stage 1, each set up in a running guest and the bless tried
//! through it (`nimbus-init bless-stage1`, mark-good's own code path).
//! Part of the smoke: the host kernel here has no vfat, so this cannot be
//! a host-mode test.
//!
//! Linux keeps one superblock per block device, shared by every mount of
//! it, and a new mount cannot change its read-only state (EBUSY). So a
//! writer succeeds wherever the partition is held read-write or not at
//! all, and must fail with a reason wherever it is held read-only, in
//! this mount namespace or another; a reader succeeds everywhere.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::vm::e2e::Ssh;

const INIT: &str = "/usr/lib/nimbus/nimbus-init";
const DEV: &str = "/dev/vda1";

/// Put the running copy (a) back on trial in GRUB's environment, so there
/// is a bless to do: `nimbus_s1_try=a`, one `#` of padding less (the block
/// stays 1024 bytes). Under the ESP lock, as Nimbus's own writers are.
fn unbless() -> String {
    format!(
        "set -e; mkdir -p /run/t/esp; flock /run/nimbus/esp.lock sh -c '\
         mount {DEV} /run/t/esp && \
         sed -i -e \"s/^nimbus_s1_try=$/nimbus_s1_try=a/\" -e \"\\$ s/#$//\" /run/t/esp/nimbus/grubenv && \
         test $(stat -c %s /run/t/esp/nimbus/grubenv) = 1024; r=$?; umount /run/t/esp; exit $r'; \
         if {INIT} bless-stage1 --check; then echo 'copy a still blessed' >&2; exit 1; fi"
    )
}

struct Case {
    name: &'static str,
    setup: &'static str,
    /// Where a bless must fail, a phrase its error must carry.
    refused: Option<&'static str>,
    teardown: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "not mounted",
        setup: "systemctl stop boot.automount boot.mount; ! findmnt -S /dev/vda1",
        refused: None,
        teardown: "true",
    },
    Case {
        name: "automount not yet triggered",
        setup: "systemctl stop boot.mount; systemctl start boot.automount; \
                findmnt -t autofs /boot >/dev/null && ! findmnt -t vfat /boot",
        refused: None,
        // The automount still mounts the partition afterwards.
        teardown: "test -s /boot/nimbus/grubenv",
    },
    Case {
        name: "mounted read-write by systemd (/boot)",
        setup: "systemctl start boot.automount; ls /boot/nimbus >/dev/null; \
                findmnt -no OPTIONS -t vfat /boot | grep -q '^rw,'",
        refused: None,
        teardown: "true",
    },
    Case {
        name: "mounted read-only",
        setup: "systemctl stop boot.automount boot.mount; mkdir -p /run/t/ro; \
                mount -o ro /dev/vda1 /run/t/ro",
        refused: Some("mounted read-only at /run/t/ro"),
        teardown: "umount /run/t/ro",
    },
    Case {
        name: "mounted read-only in another mount namespace",
        setup: "systemctl stop boot.automount boot.mount; \
                mkdir -p /run/t; setsid unshare -m --propagation private sh -c \
                'mount -o ro /dev/vda1 /mnt && exec sleep 600' </dev/null >/dev/null 2>&1 & \
                echo $! > /run/t/ns.pid; sleep 2; kill -0 $(cat /run/t/ns.pid) && \
                ! findmnt -S /dev/vda1 >/dev/null",
        refused: Some("read-only in another mount namespace"),
        // (The holder by its pid: `pkill -f` with its pattern would match
        // this very shell's command line.)
        teardown:
            "p=$(cat /run/t/ns.pid); kill $p; while kill -0 $p 2>/dev/null; do sleep 0.2; done",
    },
];

fn sh(ssh: &Ssh, what: &str, cmd: &str) -> anyhow::Result<(i32, String)> {
    let o = ssh.run(cmd).with_context(|| format!("ssh for {what}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let rc = o.status.code().unwrap_or(-1);
    if rc == 255 {
        bail!("{what}: ssh failed: {text}");
    }
    Ok((rc, text))
}

/// Poll `cmd` until it exits 0, for at most `limit`.
fn until(ssh: &Ssh, what: &str, cmd: &str, limit: Duration) -> anyhow::Result<String> {
    let t0 = Instant::now();
    loop {
        let (rc, text) = sh(ssh, what, cmd)?;
        if rc == 0 {
            return Ok(text);
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {} s; last: {text}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Every case; returns one line per case for the smoke's table.
pub fn run(ssh: &Ssh) -> anyhow::Result<Vec<String>> {
    let mut rows = Vec::new();
    for c in CASES {
        let what = format!("ESP {}", c.name);
        let (rc, out) = sh(ssh, &what, &unbless())?;
        if rc != 0 {
            bail!("{what}: putting copy a back on trial failed ({rc}): {out}");
        }
        let (rc, out) = sh(ssh, &what, c.setup)?;
        if rc != 0 {
            bail!("{what}: setting the state up failed ({rc}): {out}");
        }
        let (rc, out) = sh(ssh, &what, &format!("{INIT} bless-stage1"))?;
        // Reads work in every state.
        let (check_rc, check_out) = sh(ssh, &what, &format!("{INIT} bless-stage1 --check"))?;
        match c.refused {
            None => {
                if rc != 0 || check_rc != 0 {
                    bail!(
                        "{what}: the bless failed ({rc}): {out}; --check ({check_rc}): {check_out}"
                    );
                }
            }
            Some(phrase) => {
                if rc != 1 || !out.contains(phrase) {
                    bail!("{what}: the bless should fail saying {phrase:?}; got ({rc}): {out}");
                }
                if check_rc != 1 {
                    bail!("{what}: --check should read the ESP and answer 'not the default' (1); got ({check_rc}): {check_out}");
                }
                // Reported, with the reason, until update-engine's retry
                // succeeds once the state is gone.
                until(
                    ssh,
                    &what,
                    &format!("updatectl status | grep -F \"is not the loaders' default\" | grep -F '{phrase}'"),
                    Duration::from_secs(90),
                )?;
            }
        }
        let (rc, out) = sh(ssh, &what, c.teardown)?;
        if rc != 0 {
            bail!("{what}: after the bless: {out} ({rc})");
        }
        if c.refused.is_some() {
            until(
                ssh,
                &format!("{what}: update-engine's retry once writable"),
                &format!(
                    "{INIT} bless-stage1 --check && ! updatectl status | grep -F \"is not the loaders' default\""
                ),
                Duration::from_secs(90),
            )?;
        }
        rows.push(format!(
            "{}: {}",
            c.name,
            c.refused.map_or_else(
                || "blessed".to_string(),
                |p| format!("refused ({p}), healed by update-engine once writable")
            )
        ));
    }
    let (rc, out) = sh(
        ssh,
        "ESP: /boot restored",
        "systemctl start boot.automount && test -s /boot/nimbus/grubenv",
    )?;
    if rc != 0 {
        bail!("ESP: restoring /boot's automount: {out}");
    }
    Ok(rows)
}
