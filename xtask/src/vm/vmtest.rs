//! `cargo xtask vmtest [--list] [NAME...]`: the VM tier.
//!
//! The default tier is `cargo xtask test` (what `cargo test --workspace`
//! runs, two binaries at a time); the tests that boot guests
//! beyond the lean smoke (the boot matrix, the e2e story, Vagrant, the
//! cluster, the fuzz smoke) are marked `#[ignore = "vm tier: cargo xtask
//! vmtest"]` and found here the way cargo would run them: the workspace's
//! test binaries (`cargo test --no-run`), each asked for its ignored tests.
//! Each test runs in a process of its own, under a deadline, with a ledger
//! that counts its guest boots and image builds (`ledger.rs`). Tests of one
//! guest run `--jobs` at a time (two by default, see the flag); the tests
//! in [`ALONE`] (several guests whose timing is what they measure, or a
//! hypervisor of their own) always run with nothing beside them. One row
//! per test, then `vmtest: passed=N failed=N minutes=M`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;

use crate::tier::{lanes, report, run_logged, test_binaries, Row, TestBinary};

#[derive(Args)]
pub struct VmTest {
    /// Only list the VM-tier tests (`binary::test`), one a line.
    #[arg(long)]
    list: bool,
    /// Run only these: a test binary (`cluster`, `boot`), a test's name,
    /// or a `binary::test` prefix (`boot::usr_b`). Default: all.
    names: Vec<String>,
    /// A test still running after this many minutes is killed and fails.
    /// Above the cluster's own deadlines (its harness: 40 minutes, then its
    /// watchdog; its test: 45), so that the harness, not this, cuts a slow
    /// run, and its diagnostics (each host's state, the steps' times) are
    /// printed rather than lost with the killed process.
    #[arg(long, default_value_t = 48)]
    test_timeout_minutes: u64,
    /// How many single-guest tests run at once (the tests in ALONE always
    /// run by themselves): two, one guest per core. The one failure seen
    /// with two (2026-12-07, a guest whose disk was 1 MiB short of its
    /// GPT) was two processes of `boot` handed the same cached image into
    /// one `--out` while the other copied it; hand-outs now replace by
    /// rename (`image_cache::hand_out`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=8))]
    jobs: u64,
}

/// Test binaries whose tests run with no other test beside them: the
/// cluster (three guests on a probe that counts every slow second) and
/// the three-node Vagrant cluster (three guests on two cores).
/// Vagrant's one libvirt guest runs in a lane like any single-guest test:
/// its network lives in a namespace of its own, and nothing it measures
/// depends on time.
const ALONE: &[&str] = &["cluster", "vagrant_cluster"];

/// The single-guest tests that take longest, started first so that the
/// lanes end together (longest first: e2e about 480 s, Vagrant about 320 s,
/// each boot test 60-270 s).
const FIRST: &[&str] = &["e2e", "vagrant"];

/// One VM-tier test: which binary holds it and how to run it.
#[derive(Debug, Clone)]
struct VmTestCase {
    binary: String,
    exe: PathBuf,
    /// The package directory: cargo runs tests from there.
    cwd: PathBuf,
    name: String,
}

impl VmTestCase {
    fn full(&self) -> String {
        format!("{}::{}", self.binary, self.name)
    }
}

/// Every ignored test of every test binary: the VM tier.
fn discover(root: &Path) -> anyhow::Result<Vec<VmTestCase>> {
    let mut cases = Vec::new();
    for TestBinary {
        name: binary,
        exe,
        cwd,
        ..
    } in test_binaries(root)?
    {
        let o = nimbus_testkit::proc::output(
            Command::new(&exe)
                .args(["--list", "--ignored", "--format", "terse"])
                .current_dir(&cwd),
            Duration::from_secs(60),
        )?;
        if !o.status.success() {
            bail!("{} --list --ignored failed ({})", exe.display(), o.status);
        }
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(name) = l.strip_suffix(": test") {
                cases.push(VmTestCase {
                    binary: binary.clone(),
                    exe: exe.clone(),
                    cwd: cwd.clone(),
                    name: name.to_string(),
                });
            }
        }
    }
    Ok(cases)
}

/// NAME selects a test binary (`cluster`), one test (`usr_b_with_a_bad_signature_is_refused`
/// or `boot::usr_b_with_a_bad_signature_is_refused`), or, with `::`, every test whose
/// full name starts with it (`boot::usr_b`). Never a bare substring: `boot` must
/// not also select e2e's `..._boots_the_new_version`.
fn selected(c: &VmTestCase, names: &[String]) -> bool {
    names.is_empty()
        || names.iter().any(|n| {
            *n == c.binary || *n == c.name || (n.contains("::") && c.full().starts_with(n.as_str()))
        })
}

/// Run one test in its own process group under `limit`; its row.
fn run_one(c: &VmTestCase, logs: &Path, limit: Duration) -> Row {
    eprintln!("vmtest: {} ...", c.full());
    let mut cmd = Command::new(&c.exe);
    cmd.args(["--ignored", "--exact", &c.name, "--nocapture"])
        .current_dir(&c.cwd);
    let row = run_logged(&c.full(), cmd, logs, limit);
    if !row.ok {
        let text = std::fs::read_to_string(&row.log).unwrap_or_default();
        eprintln!(
            "vmtest: {} FAILED; its last lines:\n{}",
            c.full(),
            nimbus_testkit::proc::tail(&text, 80)
        );
    }
    eprintln!(
        "vmtest: {} {} in {:.0} s ({} boots, {} image builds; log: {})",
        c.full(),
        if row.ok { "passed" } else { "FAILED" },
        row.seconds,
        row.boots,
        row.builds,
        row.log.display()
    );
    row
}

pub fn run(a: VmTest) -> anyhow::Result<ExitCode> {
    let root = crate::build_image::workspace_root();
    let all = discover(&root)?;
    let cases: Vec<VmTestCase> = all
        .iter()
        .filter(|c| selected(c, &a.names))
        .cloned()
        .collect();
    if a.list {
        for c in &all {
            println!("{}", c.full());
        }
        eprintln!("vmtest: {} VM-tier tests", all.len());
        return Ok(ExitCode::SUCCESS);
    }
    if cases.is_empty() {
        bail!(
            "no VM-tier test matches {:?}; `cargo xtask vmtest --list` lists them",
            a.names
        );
    }
    let logs = root.join("target/vmtest");
    std::fs::create_dir_all(&logs)?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(a.test_timeout_minutes.saturating_mul(60));
    let (alone, shared): (Vec<&VmTestCase>, Vec<&VmTestCase>) = cases
        .iter()
        .partition(|c| ALONE.contains(&c.binary.as_str()));
    let mut shared = shared;
    shared.sort_by_key(|c| {
        FIRST
            .iter()
            .position(|b| *b == c.binary)
            .unwrap_or(FIRST.len())
    });
    // The single-guest tests first, `jobs` at a time, each lane taking
    // the next test when its own is done; then the tests that run alone.
    let mut rows = lanes(&shared, a.jobs, |c| run_one(c, &logs, limit));
    for c in alone {
        rows.push(run_one(c, &logs, limit));
    }
    // The table in the order `--list` gives, whatever finished first.
    rows.sort_by_key(|r| cases.iter().position(|c| c.full() == r.name));
    Ok(if report("vmtest", &rows, t0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(binary: &str, name: &str) -> VmTestCase {
        VmTestCase {
            binary: binary.into(),
            exe: PathBuf::new(),
            cwd: PathBuf::new(),
            name: name.into(),
        }
    }

    #[test]
    fn names_select_a_binary_a_test_or_a_prefix() {
        let c = case("cluster", "rolling_update_and_faults");
        assert!(selected(&c, &[]));
        assert!(selected(&c, &["cluster".into()]));
        assert!(selected(&c, &["rolling_update_and_faults".into()]));
        assert!(selected(&c, &["cluster::rolling".into()]));
        assert!(!selected(&c, &["rolling_update".into()]));
        assert!(!selected(&c, &["boot".into()]));
        assert!(!selected(
            &case("boot", "x"),
            &["clust".into(), "e2e".into()]
        ));
        // The bug this rule fixes: `vmtest boot` also ran e2e's test.
        assert!(!selected(
            &case("e2e", "guest_updates_itself_and_boots_the_new_version"),
            &["boot".into()]
        ));
    }
}
