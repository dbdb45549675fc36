//! `cargo xtask vmtest [--list] [NAME...]`: the VM tier.
//!
//! The default tier is `cargo test --workspace`; the tests that boot guests
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

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::ledger;

#[derive(Args)]
pub struct VmTest {
    /// Only list the VM-tier tests (`binary::test`), one a line.
    #[arg(long)]
    list: bool,
    /// Run only these: a test binary (`cluster`, `boot`), a test's name,
    /// or a `binary::test` prefix (`boot::usr_b`). Default: all.
    names: Vec<String>,
    /// A test still running after this many minutes is killed and fails.
    #[arg(long, default_value_t = 40)]
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
/// cluster (three guests on a probe that counts every slow second).
/// Vagrant's one libvirt guest runs in a lane like any single-guest test:
/// its network lives in a namespace of its own, and nothing it measures
/// depends on time.
const ALONE: &[&str] = &["cluster"];

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

/// The workspace's test executables: (binary name, path, package dir).
fn test_binaries(root: &Path) -> anyhow::Result<Vec<(String, PathBuf, PathBuf)>> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit());
    // A cold build of every test binary takes about 10 minutes here.
    let o = nimbus_testkit::proc::output(&mut cmd, Duration::from_secs(45 * 60))
        .context("cargo test --no-run")?;
    if !o.status.success() {
        bail!(
            "cargo test --workspace --no-run failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut out = Vec::new();
    for line in o.stdout.as_slice().lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(name), Some(manifest)) = (
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
            v["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let dir = Path::new(manifest)
            .parent()
            .context("manifest path without a parent")?;
        out.push((name.to_string(), PathBuf::from(exe), dir.to_path_buf()));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Every ignored test of every test binary: the VM tier.
fn discover(root: &Path) -> anyhow::Result<Vec<VmTestCase>> {
    let mut cases = Vec::new();
    for (binary, exe, cwd) in test_binaries(root)? {
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

struct Row {
    name: String,
    ok: bool,
    seconds: f64,
    boots: usize,
    builds: usize,
    hits: usize,
}

/// Run one test in its own process group under `limit`; its row.
fn run_one(c: &VmTestCase, logs: &Path, limit: Duration) -> Row {
    let slug = c.full().replace("::", "-");
    let log = logs.join(format!("{slug}.log"));
    let ledger_file = logs.join(format!("{slug}.ledger"));
    let _ = std::fs::remove_file(&ledger_file);
    eprintln!("vmtest: {} ... (log: {})", c.full(), log.display());
    let t = Instant::now();
    let r = std::fs::File::create(&log)
        .and_then(|out| Ok((out.try_clone()?, out)))
        .map_err(anyhow::Error::from)
        .and_then(|(err, out)| {
            nimbus_testkit::proc::status_group(
                Command::new(&c.exe)
                    .args(["--ignored", "--exact", &c.name, "--nocapture"])
                    .current_dir(&c.cwd)
                    .env(ledger::ENV, &ledger_file)
                    .stdout(out)
                    .stderr(err),
                limit,
            )
            .map_err(anyhow::Error::from)
        });
    let ok = match &r {
        Ok(st) => st.success(),
        Err(e) => {
            // Its QEMUs went with its process group (status_group);
            // another command's on this machine are not touched.
            eprintln!("vmtest: {}: {e:#}", c.full());
            false
        }
    };
    let seconds = t.elapsed().as_secs_f64();
    let spent = std::fs::read_to_string(&ledger_file).unwrap_or_default();
    let row = Row {
        name: c.full(),
        ok,
        seconds,
        boots: ledger::count(&spent, "boot"),
        builds: ledger::count(&spent, "build"),
        hits: ledger::count(&spent, "cache-hit"),
    };
    if !ok {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!(
            "vmtest: {} FAILED; its last lines:\n{}",
            c.full(),
            nimbus_testkit::proc::tail(&text, 80)
        );
    }
    eprintln!(
        "vmtest: {} {} in {seconds:.0} s ({} boots, {} image builds)",
        c.full(),
        if ok { "passed" } else { "FAILED" },
        row.boots,
        row.builds
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
    let mut rows = Vec::new();
    // The single-guest tests first, `jobs` at a time, each worker taking
    // the next test when its own is done.
    {
        let queue = std::sync::Mutex::new(shared.into_iter());
        let done = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..a.jobs {
                s.spawn(|| loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some(c) = next else { break };
                    let row = run_one(c, &logs, limit);
                    if let Ok(mut d) = done.lock() {
                        d.push(row);
                    }
                });
            }
        });
        rows.extend(done.into_inner().unwrap_or_default());
    }
    for c in alone {
        rows.push(run_one(c, &logs, limit));
    }
    // The table in the order `--list` gives, whatever finished first.
    rows.sort_by_key(|r| cases.iter().position(|c| c.full() == r.name));
    println!("| test | result | seconds | boots | image builds | image cache hits |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} |",
            r.name,
            if r.ok { "passed" } else { "FAILED" },
            r.seconds,
            r.boots,
            r.builds,
            r.hits
        );
    }
    let passed = rows.iter().filter(|r| r.ok).count();
    let failed = rows.len() - passed;
    println!(
        "vmtest: passed={passed} failed={failed} minutes={:.1}",
        t0.elapsed().as_secs_f64() / 60.0
    );
    Ok(if failed == 0 {
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
