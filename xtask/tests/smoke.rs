//! The default tier's VM test: `cargo xtask smoke` (see xtask/src/vm/smoke.rs),
//! one SeaBIOS guest life: the stage-1 bless through each state of the
//! ESP, an update by delta, a release whose
//! health check fails and rolls back, and a boot where dm-verity refuses a
//! corrupted slot. Everything else that boots guests is the VM tier
//! (`cargo xtask vmtest`).

use std::process::Command;
use std::time::Duration;

#[test]
fn guest_updates_by_delta_rolls_back_a_bad_release_and_refuses_a_corrupt_slot() {
    // Three image builds when the cache is cold (about 3 minutes each
    // here), then about 10 minutes of guest; the smoke's own VM bounds
    // are tighter than this backstop.
    let o = nimbus_testkit::proc::output(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("smoke")
            .env("SOURCE_DATE_EPOCH", nimbus_testkit::ROOTFS_EPOCH),
        Duration::from_secs(40 * 60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "xtask smoke failed:\n{out}\n{}",
        nimbus_testkit::proc::tail(&err, 150)
    );
    eprintln!("{out}");
    let last = out.lines().last().unwrap_or("");
    assert!(
        last.starts_with(
            "smoke: ok: 1.0.0 -> 1.1.0 (delta) -> 1.2.0 rolled back -> corrupted USR-A refused"
        ),
        "{out}"
    );
    assert!(out.contains("installs it by delta ("), "{out}");
    // The first boot kexecs (new GUIDs); the update's boot does not.
    assert!(out.contains("kexec on this first boot"), "{out}");
    assert!(
        out.contains("reboots into USR-B (its stage 2 in stage 1's kernel, no kexec)"),
        "{out}"
    );
    // The stage-1 bless through each state the ESP can be in.
    for state in [
        "not mounted: blessed",
        "automount not yet triggered: blessed",
        "mounted read-write by systemd (/boot): blessed",
        "mounted read-only: refused (mounted read-only at /run/t/ro), healed by update-engine once writable",
        "mounted read-only in another mount namespace: refused (read-only in another mount namespace), healed",
    ] {
        assert!(out.contains(state), "no {state:?} in:\n{out}");
    }
}
