//! `cargo xtask fuzz`: build the cargo-fuzz (libFuzzer) targets in fuzz/
//! and run each for a while; a table of executions and findings, optionally
//! written to docs/fuzz.md.
//!
//! The targets are built with cargo-fuzz's own compiler flags (sancov
//! instrumentation, `--cfg fuzzing`) by plain `cargo build`, and run
//! directly: installing cargo-fuzz compiled a hundred crates from source on
//! every fresh machine (CI), for a wrapper around these two commands.
//! `cargo fuzz run <target>` keeps working for whoever has it.

use std::fmt::Write as _;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub const TARGETS: &[&str] = &[
    "manifest",
    "descriptor",
    "gpt",
    "update_conf",
    "cloud_config",
    "payload",
    "trust",
    "delta_index",
];

fn have_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// libFuzzer needs the target named (cargo-fuzz does the same): it keeps
/// the instrumentation flags off build scripts and proc macros.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// libFuzzer's `-timeout`: seconds one input may take before it counts as
/// a hang (a parser here takes microseconds per input).
const PER_INPUT_TIMEOUT_S: u64 = 10;
/// A cold build of every target takes about 5 minutes on 2 cores.
const BUILD_LIMIT_S: u64 = 1200;

/// What `cargo fuzz build` passes to rustc by default (cargo-fuzz 0.12,
/// coverage level 4, on Linux: optimised, with debug assertions and
/// overflow checks), plus the sanitizer.
fn rustflags(sanitizer: &str) -> String {
    let mut f = [
        "-Cdebug-assertions",
        "-Coverflow-checks",
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "-Cllvm-args=-sanitizer-coverage-stack-depth",
        "--cfg",
        "fuzzing",
    ]
    .join(" ");
    if sanitizer == "address" {
        f.push_str(" -Zsanitizer=address");
    }
    f
}

/// `address` needs a nightly toolchain (`-Zsanitizer`); `none` builds the
/// same coverage-guided libFuzzer targets with the stable one, which is
/// what a machine that can fetch no other toolchain (CI) has.
fn toolchain_args(sanitizer: &str) -> anyhow::Result<Vec<String>> {
    match sanitizer {
        "address" => {
            if !have_nightly() {
                bail!("--sanitizer address needs a nightly toolchain (`rustup toolchain install nightly`); --sanitizer none works on stable");
            }
            Ok(vec!["+nightly".into()])
        }
        "none" => Ok(Vec::new()),
        s => bail!("--sanitizer {s:?}: address or none"),
    }
}

pub fn run(
    seconds: u64,
    only: Vec<String>,
    record: bool,
    sanitizer: Option<String>,
    quick_build: bool,
) -> anyhow::Result<ExitCode> {
    let sanitizer = sanitizer.unwrap_or_else(|| {
        if have_nightly() {
            "address".into()
        } else {
            "none".into()
        }
    });
    let toolchain = toolchain_args(&sanitizer)?;
    if record && quick_build {
        bail!("--record keeps the table of an opt-level 3 build: drop --quick-build");
    }
    let root = crate::build_image::workspace_root();
    let targets: Vec<&str> = if only.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &only {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t:?}: one of {}", TARGETS.join(", "));
            }
        }
        TARGETS
            .iter()
            .copied()
            .filter(|t| only.iter().any(|o| o == t))
            .collect()
    };
    let t = Instant::now();
    // Named, so the binaries run below are the ones just built even where
    // CARGO_TARGET_DIR points elsewhere.
    let target_dir = root.join("fuzz/target");
    let mut build = Command::new("cargo");
    build
        .current_dir(root.join("fuzz"))
        .args(&toolchain)
        .args(["build", "--release", "--bins", "--target", TRIPLE])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", rustflags(&sanitizer));
    if quick_build {
        // Measured on 2 cores: a clean build 4m16s at opt-level 1 against
        // 5m05s at 3, executions per second within noise for 3 s runs.
        build.env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1");
    }
    let st = nimbus_testkit::proc::status(&mut build, Duration::from_secs(BUILD_LIMIT_S))
        .context("cargo build (fuzz targets)")?;
    if !st.success() {
        bail!("building the fuzz targets failed ({st})");
    }
    eprintln!(
        "fuzz: targets built in {:.0} s (sanitizer: {sanitizer})",
        t.elapsed().as_secs_f64()
    );
    let mut table = String::new();
    writeln!(
        table,
        "| target | seconds | executions | exec/s | corpus | result |"
    )?;
    writeln!(table, "|---|---|---|---|---|---|")?;
    let mut failed = Vec::new();
    for target in targets {
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let t = Instant::now();
        let artifacts = root.join("fuzz/artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let exe = target_dir.join(TRIPLE).join("release").join(target);
        let mut run = Command::new(&exe);
        run.current_dir(&root)
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-print_final_stats=1",
                "-rss_limit_mb=2048",
                "-max_len=65536",
                // One input that takes longer than this is a hang, reported
                // as a crash (libFuzzer's default is 1200 s per input).
                &format!("-timeout={PER_INPUT_TIMEOUT_S}"),
            ])
            .arg(&corpus);
        // libFuzzer stops itself at max_total_time; the deadline is for a
        // run that does not (a hang in its own start-up or shutdown).
        let out = nimbus_testkit::proc::output(
            &mut run,
            Duration::from_secs(seconds + 2 * PER_INPUT_TIMEOUT_S + 60),
        )
        .with_context(|| format!("running {}", exe.display()))?;
        let secs = t.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&out.stderr);
        let stat = |k: &str| -> u64 {
            err.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{k}:")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let execs = stat("number_of_executed_units");
        let files = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        let result = if out.status.success() {
            "no crash".to_string()
        } else {
            let artifact = err
                .lines()
                .find(|l| l.contains("Test unit written to"))
                .unwrap_or("see the output")
                .to_string();
            failed.push(target);
            eprintln!("{err}");
            format!("CRASH: {artifact}")
        };
        writeln!(
            table,
            "| {target} | {secs:.0} | {execs} | {:.0} | {files} | {result} |",
            execs as f64 / secs.max(1.0)
        )?;
        eprintln!("fuzz: {target}: {execs} executions in {secs:.0} s, {result}");
    }
    print!("{table}");
    if record {
        let doc = format!(
            "# Fuzzing\n\nTargets in `fuzz/fuzz_targets/` (cargo-fuzz, libFuzzer, sanitizer: {sanitizer}), run with\n`cargo xtask fuzz --seconds {seconds} --sanitizer {sanitizer} --record` on {}:\n\n{table}\n\
             Inputs that crashed become regression tests next to the code they broke; none so far.\n",
            crate::bench::common::machine()
        );
        std::fs::write(root.join("docs/fuzz.md"), doc)?;
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
