//! `cargo xtask e2e` in the test suite (QEMU TCG): the guest's own
//! update-engine updates 1.0.0 to 1.1.0 from a loopback repository, then
//! takes 1.2.0 whose health check fails and rolls back to 1.1.0 by itself
//! (reported by `updatectl status` in the guest), then follows
//! `updatectl channel beta` to 1.3.0.

#[test]
fn guest_updates_itself_and_boots_the_new_version() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("e2e")
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("xtask e2e");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "xtask e2e failed:\n{out}\n{err}");
    assert!(
        out.contains("e2e: ok: 1.0.0 -> 1.1.0 -> 1.2.0 (health failed, rolled back to 1.1.0) -> channel beta -> 1.3.0"),
        "{out}"
    );
    assert!(out.contains("USR-A 3/0/1, USR-B 2/0/1"), "{out}");
}
