//! `cargo xtask e2e` in the test suite: the guest's own update-engine
//! updates 1.0.0 to 1.1.0 from a loopback repository, reboots into USR-B
//! and marks it good (QEMU TCG).

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
    assert!(out.contains("e2e: ok: 1.0.0 -> 1.1.0"), "{out}");
    assert!(out.contains("USR-A 1/0/1, USR-B 2/0/1"), "{out}");
}
