//! The fuzz targets build and run in the suite: `cargo xtask fuzz` with the
//! stable toolchain (`--sanitizer none`: CI can fetch no nightly), a short
//! run per target. Long runs with AddressSanitizer are in docs/fuzz.md.

#[test]
#[ignore = "vm tier: cargo xtask vmtest"]
fn every_fuzz_target_builds_and_runs_without_a_crash() {
    // Backstop: a cold build of the targets is about 5 minutes.
    let o = nimbus_testkit::proc::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_xtask")).args([
            "fuzz",
            "--seconds",
            "3",
            "--sanitizer",
            "none",
            "--quick-build",
        ]),
        std::time::Duration::from_secs(30 * 60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "xtask fuzz failed:\n{out}\n{err}");
    // Every target in fuzz/fuzz_targets has its row, and each ran: a target
    // added to the directory but not to the command fails here.
    let mut targets: Vec<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/fuzz_targets"))
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .path()
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
    targets.sort();
    assert_eq!(targets.len(), 8, "{targets:?}");
    for t in &targets {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("| {t} |")))
            .unwrap_or_else(|| panic!("no row for {t}:\n{out}"));
        let cols: Vec<&str> = row.split('|').map(str::trim).collect();
        let execs: u64 = cols[3].parse().unwrap_or(0);
        assert!(execs > 1000, "{t} barely ran: {row}");
        assert_eq!(cols[6], "no crash", "{row}");
    }
}
