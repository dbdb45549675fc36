//! `cargo xtask bench`: measured, never asserted in unit tests. Each bench
//! prints a table, writes it to docs/, and compares against a baseline
//! measured in the same run.

pub mod common;
pub mod delta;
pub mod footprint;
pub mod impact;
pub mod rauc;
pub mod update;

pub use common::machine;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::build_image;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Cold build, warm build, and image assembly against the raw-tool floor.
    Build {
        /// Skip the cold build (it downloads and installs every package: ~2 min).
        #[arg(long)]
        skip_cold: bool,
    },
    /// update-engine apply throughput and memory vs the shell pipeline and zstd decode-only.
    Update {
        /// zstd level of the 1 GiB payload.
        #[arg(long, default_value_t = 19)]
        level: i32,
    },
    /// Delta updates: bytes fetched for one package added, binaries
    /// rebuilt, and both (N -> N+2), against the full payload in the same run.
    Delta,
    /// A fio workload's latency idle, during full and delta updates under the
    /// default I/O policy, and with the cap off; the network cap's accuracy.
    Impact,
    /// An idle host's memory (a single host and a cluster host's
    /// configuration), USR and the payload: `footprint: single_idle_mib=...`.
    Footprint {
        /// Boots per configuration (the line gives medians).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
        runs: u32,
    },
    /// QEMU boot times: to the selection line and to multi-user, with and
    /// without stage 1, and a first boot (which kexecs).
    Boot {
        /// Image to boot (default: build one into target/nimbus/bench/boot).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Boots per configuration (the line gives medians).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Update { level } => crate::bench::update::bench_update(level),
        BenchCmd::Delta => crate::bench::delta::bench_delta(),
        BenchCmd::Impact => crate::bench::impact::bench_impact(),
        BenchCmd::Build { skip_cold } => bench_build(skip_cold),
        BenchCmd::Boot { image, runs } => bench_boot(image, runs),
        BenchCmd::Footprint { runs } => crate::bench::footprint::bench_footprint(runs),
    }
}

fn timed(what: &str, cmd: &mut Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn stage(r: &nimbus_image::pipeline::BuildReport, name: &str) -> f64 {
    r.stages
        .iter()
        .filter(|s| s.stage == name)
        .map(|s| s.seconds)
        .sum()
}

fn bench_build(skip_cold: bool) -> anyhow::Result<ExitCode> {
    let root = build_image::workspace_root();
    let base = root.join("target/nimbus/bench");
    let cache = base.join("cache");
    let mut rows: Vec<(String, f64)> = Vec::new();

    let build = |name: &str,
                 out: &Path,
                 keep: bool|
     -> anyhow::Result<nimbus_image::pipeline::BuildReport> {
        let mut o = build_image::prepare(build_image::parse(&[
            "--out",
            out.to_str().unwrap_or_default(),
            "--formats",
            "raw",
        ]))?;
        o.cache = cache.clone();
        o.keep_work = keep;
        let r = build_image::build(&o)?;
        eprintln!("bench: {name} build {:.1} s", r.total_seconds);
        Ok(r)
    };
    if !skip_cold {
        let _ = std::fs::remove_dir_all(&cache);
        let r = build("cold", &base.join("cold"), false)?;
        rows.push((
            "cold build (empty cache: download + mmdebstrap)".into(),
            r.total_seconds,
        ));
    }
    let warm_out = base.join("warm");
    let r = build("warm", &warm_out, true)?;
    rows.push(("warm build (rootfs cache hit)".into(), r.total_seconds));
    let ours = stage(&r, "usr") + stage(&r, "disk");
    rows.push(("  assembly: usr (mkfs.erofs + verity + descriptor) + disk (GPT + partitions + fsync + read-back)".into(), ours));

    // The floor: the same work done with the raw tools on the same inputs.
    let work = warm_out.join(".work");
    let floor_dir = base.join("floor");
    let _ = std::fs::remove_dir_all(&floor_dir);
    std::fs::create_dir_all(&floor_dir)?;
    let fs_img = floor_dir.join("usr.erofs");
    let tree = floor_dir.join("usr.tree");
    let mkfs = timed(
        "mkfs.erofs",
        Command::new("mkfs.erofs")
            .arg(format!("-T{}", r.source_date_epoch))
            .args(["--all-root", "--ignore-mtime", "--quiet"])
            .arg(&fs_img)
            .arg(work.join("usr")),
    )?;
    let salt = hex_salt();
    let verity = timed(
        "veritysetup format",
        Command::new("veritysetup")
            .args([
                "format",
                "--no-superblock",
                "--format=1",
                "--hash=sha256",
                "--data-block-size=4096",
                "--hash-block-size=4096",
            ])
            .arg(format!("--salt={salt}"))
            .arg(&fs_img)
            .arg(&tree),
    )?;
    let raw = floor_dir.join("disk.raw");
    let f = std::fs::File::create(&raw)?;
    f.set_len(r.disk_size)?;
    drop(f);
    let plan = nimbus::layout::plan(r.disk_size, r.usr_size)?;
    let off = |n: u32| {
        plan.iter()
            .find(|p| p.spec.number == n)
            .map(|p| p.offset_bytes())
            .unwrap_or(0)
    };
    let mut copy = 0.0;
    for (src, at) in [
        (work.join("esp.img"), off(1)),
        (fs_img.clone(), off(3)),
        (tree.clone(), off(3) + std::fs::metadata(&fs_img)?.len()),
        (work.join("oem.img"), off(6)),
        (work.join("root.img"), off(9)),
    ] {
        copy += timed(
            "dd",
            Command::new("dd")
                .arg(format!("if={}", src.display()))
                .arg(format!("of={}", raw.display()))
                .args([
                    "bs=1M",
                    "conv=notrunc,sparse,fsync",
                    "oflag=seek_bytes",
                    "status=none",
                ])
                .arg(format!("seek={at}")),
        )?;
    }
    let floor = mkfs + verity + copy;
    rows.push(("  floor: mkfs.erofs".into(), mkfs));
    rows.push(("  floor: veritysetup format".into(), verity));
    rows.push((
        "  floor: dd of ESP, USR fs + tree, OEM, ROOT (sparse, fsync)".into(),
        copy,
    ));
    rows.push(("  floor total".into(), floor));
    let ratio = ours / floor;

    let mut table = String::new();
    let _ = writeln!(table, "| measurement | seconds |\n|---|---|");
    for (k, v) in &rows {
        let _ = writeln!(table, "| {k} | {v:.2} |");
    }
    let _ = writeln!(
        table,
        "| **assembly / floor** | **{ratio:.2}x** (target <= 1.30x) |"
    );
    let doc = format!(
        "# Benchmark: image build\n\n`cargo xtask bench build`, {}.\nMachine: {}. Image {} GiB, USR {} MiB of files.\n\n{table}\nThe floor runs the same steps with the raw tools on the same inputs in the same run \
         (baseline measured alongside, so machine noise affects both).\n",
        chrono_like_now(),
        machine(),
        r.disk_size >> 30,
        r.usr_data_size >> 20
    );
    let path: PathBuf = root.join("docs/bench-build.md");
    std::fs::write(&path, &doc)?;
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&floor_dir);
    print!("{table}");
    println!(
        "bench-build: assembly_vs_floor={ratio:.2} warm_s={:.1}",
        r.total_seconds
    );
    Ok(if ratio <= 1.3 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn hex_salt() -> String {
    nimbus_image::usr::verity_salt()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn chrono_like_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Seconds at which each `--mark` first matched, from `xtask qemu`'s stderr.
fn boot_marks(
    image: &Path,
    append: &str,
    user_data: &Path,
    marks: &[&str],
) -> anyhow::Result<Vec<Option<f64>>> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "qemu",
        "--image",
        image.to_str().unwrap_or_default(),
        "--timeout",
        "420",
        "--user-data",
        user_data.to_str().unwrap_or_default(),
        "--until",
        marks[marks.len() - 1],
    ]);
    if !append.is_empty() {
        cmd.args(["--append", append]);
    }
    for m in marks {
        cmd.args(["--mark", m]);
    }
    cmd.stdout(std::process::Stdio::null());
    // The VM's own watchdog (420 s, and each boot stage) ends it first.
    let out = nimbus_testkit::proc::output(&mut cmd, Duration::from_secs(480))?;
    if !out.status.success() {
        bail!("boot failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Ok(marks
        .iter()
        .map(|m| {
            let key = format!("qemu: mark /{m}/ at ");
            err.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|t| t.trim_end_matches(" s").parse().ok())
        })
        .collect())
}

fn sparse_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()?;
    if !st.success() {
        bail!("cp {} {}: {st}", from.display(), to.display());
    }
    Ok(())
}

fn bench_boot(image: Option<PathBuf>, runs: u32) -> anyhow::Result<ExitCode> {
    let root = build_image::workspace_root();
    let image = match image {
        Some(i) => i,
        None => {
            let out = root.join("target/nimbus/bench/boot");
            let o = build_image::prepare(build_image::parse(&[
                "--out",
                out.to_str().unwrap_or_default(),
                "--formats",
                "raw",
                "--disk-size",
                "3G",
            ]))?;
            build_image::build(&o)?;
            out.join("nimbus.raw")
        }
    };
    // Stage-2 arguments for the direct boot, read from the image itself.
    let disk = nimbus::gpt::Disk::open_path(&image, false)?;
    let uuid = disk.partition(3)?.uuid;
    let mut d = disk;
    let desc = nimbus::release::SlotDescriptor::parse_unverified(
        &d.read_descriptor(nimbus::layout::Slot::A)?,
    )?;
    let direct = format!(
        "nimbus.usr=PARTUUID={uuid} nimbus.usrhash={}",
        desc.verity_root
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    drop(d);
    let select = "nimbus-init: selected USR-A";
    let stage2 = "nimbus-init: stage 2:";
    // stage 1's last line says which way it handed over.
    let in_place = nimbus::boot::HANDED_IN_PLACE;
    let kexec = nimbus::boot::HANDED_TO_KEXEC;
    // systemd stops printing status lines to the serial console part way
    // through boot; the serial getty's prompt is the dependable multi-user signal.
    let multi = " login: ";
    let good = "nimbus-mark-good: USR-A marked good";
    // Health delay 0: "marked good" measures the boot, not the wait.
    let scratch_ud = tempfile::tempdir_in(root.join("target"))?;
    let ud = scratch_ud.path().join("user-data");
    std::fs::write(
        &ud,
        "#cloud-config\nwrite_files:\n  - path: /etc/nimbus/health.conf\n    content: |\n      NIMBUS_HEALTH_DELAY=0\n",
    )?;
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut push = |k: &str, v: Option<f64>| {
        if let Some(v) = v {
            match rows.iter_mut().find(|(n, _)| n == k) {
                Some((_, vs)) => vs.push(v),
                None => rows.push((k.to_string(), vec![v])),
            }
        }
    };
    const FIRST_LOGIN: &str =
        "first boot (new GUIDs, so kexec): QEMU start -> multi-user (login prompt)";
    const TO_STAGE2: &str = "two-stage: QEMU start -> stage 2";
    const TO_LOGIN: &str = "two-stage: QEMU start -> multi-user (login prompt)";
    const TO_GOOD: &str = "two-stage: QEMU start -> marked good (health delay 0)";
    const DIRECT_LOGIN: &str =
        "direct (no stage 1, no kexec): QEMU start -> multi-user (login prompt)";
    for _ in 0..runs {
        // A fresh copy each time; its first boot gives the disk its own
        // GUIDs (stage 1 then kexecs, the kernel must read the new table)
        // and marks USR-A good. Every later boot is the kind a host makes
        // after each update: those are measured.
        let scratch = tempfile::tempdir_in(root.join("target"))?;
        let pristine = scratch.path().join("pristine.raw");
        let img = scratch.path().join("disk.raw");
        sparse_copy(&image, &pristine)?;
        let m = boot_marks(&pristine, "", &ud, &[kexec, multi, good])?;
        if m[0].is_none() {
            bail!("the first boot did not kexec (it changed the partition table)");
        }
        push(FIRST_LOGIN, m[1]);
        sparse_copy(&pristine, &img)?;
        let m = boot_marks(&img, "", &ud, &[select, in_place, stage2, multi, good])?;
        if m[1].is_none() {
            bail!("a later boot of an unchanged disk kexec'd: its slot boots stage 1's own kernel");
        }
        push("two-stage: QEMU start -> selection line", m[0]);
        push(TO_STAGE2, m[2]);
        push(TO_LOGIN, m[3]);
        push(TO_GOOD, m[4]);
        if let (Some(a), Some(b)) = (m[0], m[2]) {
            push(
                "two-stage: selection line -> stage 2 (verity, mount, stage 2 in place)",
                Some(b - a),
            );
        }
        sparse_copy(&pristine, &img)?;
        let m = boot_marks(&img, &direct, &ud, &[stage2, multi])?;
        push("direct (no stage 1, no kexec): QEMU start -> stage 2", m[0]);
        push(DIRECT_LOGIN, m[1]);
    }
    let median = |k: &str| -> f64 {
        let mut v = rows
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    let line = format!(
        "boot: to_stage2_s={:.1} to_login_s={:.1} to_marked_good_s={:.1} stage1_overhead_s={:.1} first_boot_login_s={:.1}",
        median(TO_STAGE2),
        median(TO_LOGIN),
        median(TO_GOOD),
        median(TO_LOGIN) - median(DIRECT_LOGIN),
        median(FIRST_LOGIN)
    );
    let mut table = String::from("| measurement | runs (s) | mean (s) |\n|---|---|---|\n");
    for (k, vs) in &rows {
        let mean = vs.iter().sum::<f64>() / vs.len() as f64;
        let all = vs
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(table, "| {k} | {all} | {mean:.1} |");
    }
    let mean = |k: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(k))
            .map(|(_, v)| v.iter().sum::<f64>() / v.len() as f64)
    };
    let cost = match (
        mean("two-stage: QEMU start -> multi-user (login prompt)"),
        mean("direct (no stage 1, no kexec): QEMU start -> multi-user (login prompt)"),
    ) {
        (Some(a), Some(b)) => a - b,
        _ => f64::NAN,
    };
    let _ = writeln!(
        table,
        "| **cost of stage 1 (multi-user, two-stage minus direct)** | | **{cost:.1}** |"
    );
    let doc = format!(
        "# Benchmark: boot\n\n`cargo xtask bench boot`, {}.\nMachine: {}; QEMU TCG (no KVM), 2 vCPUs, 2 GiB, direct kernel boot of the ESP's stage-1 kernel.\nEach run: a fresh copy's first boot (new GUIDs, so stage 1 kexecs), then two boots of that disk: through stage 1 (which goes on as stage 2 in its own kernel) and direct (stage 2 only).\n\n{table}\nThe selection itself (GPT read, boot rule, tries decrement written back) is logged by stage 1 as `(selection N ms)`; see the console of any boot test.\n",
        chrono_like_now(),
        machine()
    );
    std::fs::write(
        root.join("docs/bench-boot.md"),
        format!("{doc}\n`{line}` (medians of {runs})\n"),
    )?;
    print!("{table}");
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}
