//! What both test tiers' runners share: the workspace's test binaries as
//! cargo builds them, one process per run under a deadline in a process
//! group of its own (so whatever it started goes with it), a fixed number
//! of lanes taking the next run when their own is done, and the table.
//!
//! `cargo xtask test` (the default tier, `test_tier.rs`) runs each test
//! binary's default tests; `cargo xtask vmtest` (`vm/vmtest.rs`) each
//! ignored test of the VM tier on its own.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::ledger;

/// A test executable as cargo built it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TestBinary {
    /// The target's name (`build_image`, `smoke`, `nimbus_updater`).
    pub name: String,
    /// The package's directory name (`xtask`, `updater`) and the target's
    /// kind (`lib`, `bin`, `test`): a package's unit tests and its main's
    /// can share a name.
    pub package: String,
    pub kind: String,
    pub exe: PathBuf,
    /// The package directory: cargo runs tests from there.
    pub cwd: PathBuf,
}

/// Build every test binary of the workspace (`cargo test --workspace
/// --no-run`) and list them, sorted.
pub fn test_binaries(root: &Path) -> anyhow::Result<Vec<TestBinary>> {
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
        out.push(TestBinary {
            name: name.to_string(),
            package: dir
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kind: v["target"]["kind"][0].as_str().unwrap_or("?").to_string(),
            exe: PathBuf::from(exe),
            cwd: dir.to_path_buf(),
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// One run's result: a row of the table.
pub struct Row {
    pub name: String,
    pub ok: bool,
    pub seconds: f64,
    pub boots: usize,
    pub builds: usize,
    pub hits: usize,
    /// Its output (stdout and stderr as they interleaved).
    pub log: PathBuf,
}

/// A file name for a run's name: `boot::usr_b` -> `boot-usr_b`,
/// `swarm/nimbus_swarm (bin)` -> `swarm-nimbus_swarm-bin`.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// Run `cmd` (a test binary with its arguments) as `name`, output to
/// `logs/<slug>.log`, its guest boots and image builds counted through a
/// ledger of its own, in a process group killed at `limit`.
pub fn run_logged(name: &str, mut cmd: Command, logs: &Path, limit: Duration) -> Row {
    let slug = slug(name);
    let log = logs.join(format!("{slug}.log"));
    let ledger_file = logs.join(format!("{slug}.ledger"));
    let _ = std::fs::remove_file(&ledger_file);
    let t = Instant::now();
    let r = std::fs::File::create(&log)
        .and_then(|out| Ok((out.try_clone()?, out)))
        .map_err(anyhow::Error::from)
        .and_then(|(err, out)| {
            nimbus_testkit::proc::status_group(
                cmd.env(ledger::ENV, &ledger_file).stdout(out).stderr(err),
                limit,
            )
            .map_err(anyhow::Error::from)
        });
    let ok = match &r {
        Ok(st) => st.success(),
        Err(e) => {
            // Its QEMUs went with its process group (status_group);
            // another command's on this machine are not touched.
            eprintln!("{name}: {e:#}");
            false
        }
    };
    let spent = std::fs::read_to_string(&ledger_file).unwrap_or_default();
    Row {
        name: name.to_string(),
        ok,
        seconds: t.elapsed().as_secs_f64(),
        boots: ledger::count(&spent, "boot"),
        builds: ledger::count(&spent, "build"),
        hits: ledger::count(&spent, "cache-hit"),
        log,
    }
}

/// Run `f` over `items` in `jobs` lanes, each lane taking the next item
/// when its own is done (so the order of `items` is the order they start
/// in); the results in the order they finished.
pub fn lanes<T: Sync, R: Send>(items: &[T], jobs: u64, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let queue = std::sync::Mutex::new(items.iter());
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                // A poisoned lock means another lane panicked: stop taking work.
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some(item) = next else { break };
                let r = f(item);
                if let Ok(mut d) = done.lock() {
                    d.push(r);
                }
            });
        }
    });
    done.into_inner().unwrap_or_default()
}

/// The table, then `<what>: passed=N failed=N minutes=M`; true if all passed.
pub fn report(what: &str, rows: &[Row], started: Instant) -> bool {
    println!("| test | result | seconds | boots | image builds | image cache hits |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
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
        "{what}: passed={passed} failed={failed} minutes={:.1}",
        started.elapsed().as_secs_f64() / 60.0
    );
    failed == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_run_everything_once_and_start_in_order() {
        let started = std::sync::Mutex::new(Vec::new());
        let items: Vec<u32> = (0..9).collect();
        let mut done = lanes(&items, 2, |i| {
            started.lock().unwrap().push(*i);
            std::thread::sleep(Duration::from_millis(u64::from(9 - i)));
            *i
        });
        done.sort();
        assert_eq!(done, items);
        let started = started.into_inner().unwrap();
        // Two lanes: the first two start first, whatever finishes first.
        let mut first: Vec<u32> = started[..2].to_vec();
        first.sort();
        assert_eq!(first, vec![0, 1]);
        assert_eq!(started.len(), 9);
    }

    #[test]
    fn slugs_are_plain_file_names() {
        assert_eq!(slug("boot::usr_b"), "boot-usr_b");
        assert_eq!(slug("swarm/nimbus_swarm (bin)"), "swarm-nimbus_swarm-bin");
        assert_eq!(slug("xtask/build_image"), "xtask-build_image");
    }

    #[test]
    fn a_failing_command_is_a_failed_row_with_its_output() {
        let logs = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let r = run_logged("t::one", cmd, logs.path(), Duration::from_secs(20));
        assert!(!r.ok);
        let text = std::fs::read_to_string(&r.log).unwrap();
        assert!(text.contains("out") && text.contains("err"), "{text}");
        assert!(r.log.ends_with("t-one.log"));
        // Past its limit the command is killed and the row fails.
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let t = Instant::now();
        let r = run_logged("t::slow", cmd, logs.path(), Duration::from_millis(300));
        assert!(!r.ok);
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
