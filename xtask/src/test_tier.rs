//! `cargo xtask test [NAME...]`: the default tier, the tests `cargo test
//! --workspace` runs, with the test binaries two at a time.
//!
//! `cargo test` runs one test binary after another. Here most of the
//! tier's time is four binaries that wait on one core or on a guest
//! (`build_image.rs`: mmdebstrap and single-threaded assembly; `smoke.rs`:
//! a TCG guest booting five times; `release_update.rs`; `powercut.rs`:
//! one thread of replays), so two lanes, those four first, finish the tier
//! in less time than one. What they share is already safe to share: image
//! builds go through the image cache's lock, the root filesystem's cache
//! has its own, each test finds its own ports and temporary directories.
//!
//! Each binary runs as cargo would run it (from its package directory,
//! default tests only, libtest's own threads), in a process group of its
//! own under a deadline. Its output is printed whole when it ends, then a
//! row per binary and `test: passed=N failed=N minutes=M`; exit 1 if any
//! failed. The doc-tests run first, through cargo.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::tier::{lanes, report, run_logged, test_binaries, Row, TestBinary};

#[derive(Args)]
pub struct Test {
    /// Only these test binaries (`build_image`, `nimbus_updater`, `dbus`).
    /// Default: all.
    names: Vec<String>,
    /// How many test binaries run at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=8))]
    jobs: u64,
    /// A test binary still running after this many minutes is killed and
    /// fails (each test's own deadlines are tighter).
    #[arg(long, default_value_t = 45)]
    test_timeout_minutes: u64,
}

/// The binaries that take longest, started first so that the lanes end
/// together. The smoke leads: its three images (the first a cold build
/// when the machine is new: the release compile of the image's binaries,
/// mmdebstrap beside it) come before five guest boots on one core, and
/// `build_image`'s own builds, taking the image cache's lock in turn, fit
/// beside those boots; `release_update` then finds its two images in the
/// cache (the smoke's), and `powercut` needs none. Measured warm, 612,
/// 245, 69 and 104 s side by side; every other binary is under 25 s.
const FIRST: &[&str] = &["smoke", "build_image", "release_update", "powercut"];

/// The order the binaries start in: [`FIRST`], then the rest by name.
fn order(mut bins: Vec<TestBinary>) -> Vec<TestBinary> {
    bins.sort_by_key(|b| {
        (
            FIRST
                .iter()
                .position(|f| *f == b.name)
                .unwrap_or(FIRST.len()),
            b.name.clone(),
        )
    });
    bins
}

/// `package/target`, and the kind where it is not an integration test:
/// `swarm/nimbus_swarm (lib)`, `swarm/nimbus_swarm (bin)`, `xtask/smoke`.
fn label(b: &TestBinary) -> String {
    match b.kind.as_str() {
        "test" => format!("{}/{}", b.package, b.name),
        k => format!("{}/{} ({k})", b.package, b.name),
    }
}

fn run_binary(b: &TestBinary, logs: &std::path::Path, limit: Duration) -> Row {
    let mut cmd = Command::new(&b.exe);
    cmd.current_dir(&b.cwd);
    let name = label(b);
    let row = run_logged(&name, cmd, logs, limit);
    let text = std::fs::read_to_string(&row.log).unwrap_or_default();
    // One block per binary, printed whole so the lanes do not interleave.
    println!(
        "==> {name} {} in {:.0} s ({})\n{}",
        if row.ok { "passed" } else { "FAILED" },
        row.seconds,
        b.exe.display(),
        text.trim_end()
    );
    row
}

pub fn run(a: Test) -> anyhow::Result<ExitCode> {
    let root = crate::build_image::workspace_root();
    let t0 = Instant::now();
    // Doc-tests are compiled by rustdoc at run time: cargo runs them.
    let st = nimbus_testkit::proc::status(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["test", "--workspace", "--doc", "--quiet"]),
        Duration::from_secs(20 * 60),
    )
    .context("cargo test --workspace --doc")?;
    if !st.success() {
        bail!("the doc-tests failed ({st})");
    }
    let all = test_binaries(&root)?;
    let bins: Vec<TestBinary> = all
        .iter()
        .filter(|b| a.names.is_empty() || a.names.contains(&b.name))
        .cloned()
        .collect();
    if bins.is_empty() {
        let mut names: Vec<&str> = all.iter().map(|b| b.name.as_str()).collect();
        names.dedup();
        bail!(
            "no test binary is named {:?}; there are: {}",
            a.names,
            names.join(", ")
        );
    }
    let logs = root.join("target/test-tier");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let limit = Duration::from_secs(a.test_timeout_minutes.saturating_mul(60));
    let bins = order(bins);
    eprintln!(
        "test: {} test binaries, {} at a time (logs: {})",
        bins.len(),
        a.jobs,
        logs.display()
    );
    let mut rows = lanes(&bins, a.jobs, |b| run_binary(b, &logs, limit));
    rows.sort_by(|x, y| x.name.cmp(&y.name));
    Ok(if report("test", &rows, t0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn bin(name: &str) -> TestBinary {
        TestBinary {
            name: name.into(),
            package: "p".into(),
            kind: "test".into(),
            exe: PathBuf::from(format!("/t/{name}-0")),
            cwd: PathBuf::new(),
        }
    }

    #[test]
    fn the_long_binaries_start_first_then_the_rest_by_name() {
        let got: Vec<String> = order(
            [
                "dbus",
                "smoke",
                "apply_root",
                "powercut",
                "build_image",
                "release_update",
            ]
            .into_iter()
            .map(bin)
            .collect(),
        )
        .into_iter()
        .map(|b| b.name)
        .collect();
        assert_eq!(
            got,
            [
                "smoke",
                "build_image",
                "release_update",
                "powercut",
                "apply_root",
                "dbus"
            ]
        );
    }
}
