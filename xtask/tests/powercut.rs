//! `cargo xtask powercut`: at least 2000 power cuts across the update's
//! writes and the boot's GPT writes; every one leaves a disk that boots a
//! verified slot and a GPT that is the old or the new table; cuts in the
//! state-file, update.conf and cloud-config writes leave every file old or
//! new, cuts in a stage-1 update of the ESP leave each loader a whole stage
//! 1, and the same writes without their fsync are caught.

#[test]
fn every_cut_leaves_a_bootable_disk() {
    // Backstop: about 2000 cuts, each a replay on an in-memory disk.
    let o = nimbus_testkit::proc::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["powercut", "--points", "2000"]),
        std::time::Duration::from_secs(30 * 60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
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
    assert!(field("points") >= 2000, "{last}");
    // After each cut in the update, the engine run again on the cut disk
    // finished or refused cleanly (the run fails otherwise).
    let rerun = out
        .lines()
        .find(|l| l.starts_with("engine re-run after a cut"))
        .unwrap_or_else(|| panic!("no engine re-runs in {out}"));
    assert!(rerun.ends_with(", 0 otherwise"), "{rerun}");
    // The negative control: the harness itself must catch a broken write
    // order (the GPT flip before the slot data).
    // Two: the flip before the slot data, and the slot data never synced.
    let controls: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("negative control"))
        .collect();
    assert_eq!(controls.len(), 2, "{out}");
    for control in controls {
        let nums: Vec<usize> = control
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        assert!(nums.len() >= 3 && nums[1] + nums[2] > 0, "{control}");
    }
    assert_eq!(field("unbootable"), 0, "{out}");
    assert_eq!(field("mixed_state"), 0, "{out}");
    for name in [
        "update-engine (state file, update.conf)",
        "cloud-config apply",
    ] {
        let row: Vec<usize> = out
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row for {name}: {out}"))
            .split('|')
            .skip(2)
            .filter_map(|c| c.trim().parse().ok())
            .collect();
        let [steps, files, points, mixed, without_fsync] = row[..] else {
            panic!("{name}: {row:?}");
        };
        assert!(
            steps >= 8 && files >= 2 && points > steps,
            "{name}: {row:?}"
        );
        assert_eq!(mixed, 0, "{name}: {out}");
        assert!(
            without_fsync > 0,
            "{name}: a broken write path must show: {row:?}"
        );
    }
    // The ESP's stage-1 update, then mark-good's bless: each loader's
    // choice is a whole stage 1 after every cut; without the fsyncs, not.
    let row: Vec<usize> = out
        .lines()
        .find(|l| l.starts_with("| install into copy b, then bless |"))
        .unwrap_or_else(|| panic!("no ESP row: {out}"))
        .split('|')
        .skip(2)
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let [steps, points, not_whole, without_fsync] = row[..] else {
        panic!("ESP: {row:?}");
    };
    assert!(steps >= 10 && points > steps, "ESP: {row:?}");
    assert_eq!(not_whole, 0, "ESP: {out}");
    assert!(
        without_fsync > 0,
        "ESP: a broken write path must show: {row:?}"
    );
}
