//! `cargo xtask e2e` in the test suite (QEMU TCG, SeaBIOS + GRUB): the
//! guest (1.0.0, booted from its second disk next to a pristine copy)
//! learns release key 2 from a loopback repository, then follows
//! `updatectl channel beta` to 1.3.0
//! (key 2 alone, key 1 removed, a new stage 1 tried once and blessed);
//! key 1 is refused by update-engine and by stage 1; 1.4.0's stage 1
//! cannot start and the loader falls back to the old one, reported. Every
//! one of those updates comes by delta (Range requests for pack frames).
//! N -> N+1 on stable and the health-check rollback on real boots are
//! `xtask/tests/cluster.rs`'s.

#[test]
#[ignore = "vm tier: cargo xtask vmtest"]
fn guest_updates_itself_and_boots_the_new_version() {
    // Backstop: the story boots about ten times.
    let o = nimbus_testkit::proc::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("e2e")
            .env("SOURCE_DATE_EPOCH", nimbus_testkit::ROOTFS_EPOCH),
        std::time::Duration::from_secs(40 * 60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "xtask e2e failed:\n{out}\n{err}");
    assert!(
        out.contains("e2e: ok: 1.0.0 -> channel beta -> 1.3.0"),
        "{out}"
    );
    assert!(
        out.contains("1.3.0 (new key, new stage 1) -> 1.4.0 (its stage 1 fell back)"),
        "{out}"
    );
    assert!(out.contains("USR-A 3/0/1, USR-B 2/0/1"), "{out}");
    assert!(out.contains("every update came by delta"), "{out}");
}
