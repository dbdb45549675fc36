//! `cargo xtask powercut`: at least 200 power cuts across the update's
//! writes and the boot's GPT writes; every one leaves a disk that boots a
//! verified slot and a GPT that is the old or the new table.

#[test]
fn every_cut_leaves_a_bootable_disk() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["powercut", "--points", "200"])
        .output()
        .expect("xtask powercut");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let last = out.lines().last().unwrap_or("");
    let field = |k: &str| -> usize {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in {last:?}"))
    };
    assert!(field("points") >= 200, "{last}");
    assert_eq!(field("unbootable"), 0, "{out}");
    assert_eq!(field("mixed_state"), 0, "{out}");
}
