//! `cargo xtask bench update`: apply throughput and memory of update-engine
//! against the shell pipeline and the zstd decode-only limit, all on the
//! same payload in the same run, served over loopback HTTP.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nimbus::keys::ReleaseKey;
use nimbus::layout::{Slot, MIB};
use semver::Version;

use crate::bench::common::{median3, timed_sh};
use crate::httpd;
use nimbus_testkit::host;

const GIB: u64 = 1 << 30;

/// The source filesystem: USR-A of the newest built image (a real erofs
/// of Debian's /usr), so the data compresses like a release does.
pub fn source_fs(root: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let out = work.join("src.erofs");
    if out.exists() {
        return Ok(out);
    }
    let mut builds: Vec<PathBuf> = std::fs::read_dir(root.join("target/nimbus"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("build.json").exists() && p.join("nimbus.raw").exists())
        .collect();
    builds.sort();
    let Some(b) = builds.pop() else {
        bail!("no built image under target/nimbus: run `cargo xtask build-image` first");
    };
    let bj: serde_json::Value = serde_json::from_slice(&std::fs::read(b.join("build.json"))?)?;
    let data = bj["usr_data_size"]
        .as_u64()
        .context("build.json: usr_data_size")?;
    let disk = nimbus::gpt::Disk::open_path(&b.join("nimbus.raw"), false)?;
    let p = disk.partition(Slot::A.partition_number())?;
    let status = Command::new("dd")
        .arg(format!("if={}", b.join("nimbus.raw").display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "iflag=skip_bytes,count_bytes", "status=none"])
        .arg(format!("skip={}", p.offset_bytes()))
        .arg(format!("count={data}"))
        .status()?;
    if !status.success() {
        bail!("extracting USR-A from {}", b.display());
    }
    Ok(out)
}

pub struct Payload {
    pub dir: PathBuf,
    pub raw_size: u64,
    pub compressed: u64,
}

/// A slot of `size` bytes of filesystem data (the source repeated), sealed
/// and compressed into `dir` as build-image leaves a version; `patch`
/// replaces 4 MiB at that offset with other bytes (a changed package, for
/// a delta).
pub fn payload_with(
    work: &Path,
    src: &Path,
    version: &str,
    size: u64,
    level: i32,
    key: &ReleaseKey,
    patch: Option<u64>,
) -> anyhow::Result<Payload> {
    let dir = work.join(version);
    let bj_path = dir.join("build.json");
    if let Ok(b) = std::fs::read(&bj_path) {
        let bj: serde_json::Value = serde_json::from_slice(&b)?;
        if bj["key"] == key.id.to_string()
            && bj["level"] == level
            && bj["patch"] == serde_json::json!(patch)
            && dir.join("usr.img.zst").exists()
            && dir.join("trust.json").exists()
        {
            return Ok(Payload {
                dir: dir.clone(),
                raw_size: bj["payload"]["raw_size"].as_u64().unwrap_or(0),
                compressed: bj["payload"]["compressed_size"].as_u64().unwrap_or(0),
            });
        }
    }
    std::fs::create_dir_all(&dir)?;
    let fs = dir.join("data.img");
    {
        use std::io::Write;
        let src_bytes = std::fs::read(src)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&fs)?);
        let mut left = size;
        while left > 0 {
            let n = left.min(src_bytes.len() as u64) as usize;
            f.write_all(&src_bytes[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        if let Some(at) = patch {
            use std::io::{Seek, SeekFrom};
            let mut f = f.into_inner()?;
            f.seek(SeekFrom::Start(at))?;
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ at;
            let other: Vec<u8> = (0..4 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 40) as u8 + b'0'
                })
                .collect();
            f.write_all(&other)?;
        }
    }
    let v: Version = version.parse()?;
    eprintln!(
        "bench update: sealing and compressing {} MiB at zstd -{level} ...",
        size >> 20
    );
    let slot = nimbus_image::usr::seal(&fs, &v, 1_700_000_000, size + 256 * MIB, &[key])?;
    let info = slot.write_payload(&dir.join("usr.img.zst"), level)?;
    std::fs::remove_file(&fs)?;
    let bj = serde_json::json!({
        "version": version,
        "verity_root": hex::encode(slot.fields.verity_root),
        "payload": info,
        "key": key.id.to_string(),
        "level": level,
        "patch": patch,
    });
    std::fs::write(
        dir.join("trust.json"),
        nimbus::trust::TrustDoc::initial([key.public()], 1).to_bytes(),
    )?;
    std::fs::write(&bj_path, serde_json::to_vec_pretty(&bj)?)?;
    Ok(Payload {
        dir,
        raw_size: info.raw_size,
        compressed: info.compressed_size,
    })
}

/// A host: disk with a tiny valid USR-A at 0.0.1 and room for `usr_size`,
/// plus a root with keys and update.conf.
fn host(
    work: &Path,
    name: &str,
    usr_size: u64,
    key: &ReleaseKey,
    server: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = work.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tiny"))?;
    // A few blocks: a one-block filesystem has no verity tree at all.
    std::fs::write(dir.join("tiny/os-release"), "ID=nimbus\n".repeat(4096))?;
    host::root(
        &dir.join("root"),
        &nimbus::trust::TrustDoc::initial([key.public()], 1).to_bytes(),
        &format!("GROUP=bench\nSERVER={server}\nIO_WRITE_BPS=unlimited\nIO_CLASS=best-effort\n"),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let small = nimbus_image::usr::build(&nimbus_image::usr::UsrInputs {
        usr_dir: &dir.join("tiny"),
        out_fs: &dir.join("a.erofs"),
        version: &"0.0.1".parse()?,
        compression: nimbus_image::usr::Compression::None,
        epoch: 1_700_000_000,
        fs_uuid: uuid::Uuid::from_u128(1),
        slot_size: usr_size,
        keys: &[key],
    })?;
    let disk = host::disk(
        &dir.join("disk.raw"),
        usr_size,
        7,
        host::SlotInit::good(1, Some(&small)),
        host::SlotInit::EMPTY,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok((disk, dir.join("root")))
}

/// A sparse Nimbus disk with USR-A good (1/0/1) and USR-B empty, slots of
/// `usr_size` bytes.
pub fn empty_host_disk(disk: &Path, usr_size: u64) -> anyhow::Result<PathBuf> {
    host::disk(
        disk,
        usr_size,
        7,
        host::SlotInit::good(1, None),
        host::SlotInit::EMPTY,
    )
    .map_err(|e| anyhow::anyhow!(e))
}

fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Run update-engine --once; wall seconds and peak RSS (VmHWM, polled).
pub fn run_engine(bin: &Path, root: &Path, disk: &Path) -> anyhow::Result<(f64, u64)> {
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args(["--once", "--root"])
        .arg(root)
        .arg("--disk")
        .arg(disk)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut hwm = 0;
    loop {
        if let Some(k) = vm_kib(pid, "VmHWM:") {
            hwm = hwm.max(k);
        }
        if let Some(st) = child.try_wait()? {
            let secs = t0.elapsed().as_secs_f64();
            if !st.success() {
                let mut err = String::new();
                use std::io::Read;
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("update-engine failed ({st}): {err}");
            }
            return Ok((secs, hwm));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The release build of update-engine, as hosts run it.
pub fn release_engine(root: &Path) -> anyhow::Result<PathBuf> {
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "nimbus-updater",
            "--bin",
            "update-engine",
        ])
        .status()?;
    if !st.success() {
        bail!("building update-engine failed");
    }
    Ok(crate::build_image::cargo_target_dir(root).join("release/update-engine"))
}

/// A release key kept in `work/key`, so payloads cached there stay valid.
pub fn bench_key(work: &Path) -> anyhow::Result<ReleaseKey> {
    let key_dir = work.join("key");
    Ok(match ReleaseKey::load_dir(&key_dir) {
        Ok(k) => k,
        Err(_) => {
            let k = ReleaseKey::generate()?;
            k.write_to_dir(&key_dir)?;
            k
        }
    })
}

pub fn bench_update(level: i32) -> anyhow::Result<std::process::ExitCode> {
    let root = crate::build_image::workspace_root();
    let work = root.join("target/nimbus/bench/update");
    std::fs::create_dir_all(&work)?;
    let key = bench_key(&work)?;
    let bin = release_engine(&root)?;
    let src = source_fs(&root, &work)?;
    let p1 = payload_with(&work, &src, "1.0.0", GIB, level, &key, None)?;
    // The 4 GiB payload measures memory only; a fast level keeps its
    // build short, and every payload frame has the same 8 MiB window, so
    // the decoder's memory does not depend on the level.
    let p4 = payload_with(&work, &src, "4.0.0", 4 * GIB, 3, &key, None)?;

    let repo = work.join("repo");
    let _ = std::fs::remove_dir_all(&repo);
    let srv = httpd::Httpd::start(&repo);
    for (p, ch) in [(&p1, "bench"), (&p4, "bench4")] {
        nimbus_image::release::publish(&nimbus_image::release::PublishOptions::simple(
            &p.dir,
            &repo,
            ch,
            &[&key],
        ))?;
    }
    let url1 = format!("{}/payloads/1.0.0/usr.img.zst", srv.url());
    let zst1 = p1.dir.join("usr.img.zst");

    // Every row: the median of 3 runs, each after reading its input once
    // (the payload, or RAUC's bundle) so caches are warm alike.
    let warm = |f: &Path| timed_sh(&format!("cat {} > /dev/null", f.display()));
    let decode = median3(|| {
        warm(&zst1)?;
        timed_sh(&format!("zstd -q -d -c {} > /dev/null", zst1.display()))
    })?;
    let slot_file = work.join("pipeline-slot.img");
    let pipeline = median3(|| {
        warm(&zst1)?;
        let _ = std::fs::remove_file(&slot_file);
        timed_sh(&format!(
            "set -o pipefail; curl -sf {url1} | tee >(sha256sum > /dev/null) | zstd -q -d | tee >(sha256sum > /dev/null) | dd of={} bs=1M iflag=fullblock oflag=direct status=none",
            slot_file.display()
        ))
    })?;
    let _ = std::fs::remove_file(&slot_file);

    let usr1 = (p1.raw_size + 64 * MIB).next_multiple_of(MIB);
    let mut rss1 = 0;
    let engine1 = median3(|| {
        warm(&zst1)?;
        let (disk1, root1) = host(&work, "host1", usr1, &key, &srv.url())?;
        let (secs, rss) = run_engine(&bin, &root1, &disk1)?;
        rss1 = rss1.max(rss);
        std::fs::remove_file(&disk1)?;
        Ok(secs)
    })?;
    let rauc = crate::bench::rauc::install_median(&work, &zst1, p1.raw_size, usr1, None)?;
    let rauc_zstd =
        crate::bench::rauc::install_median(&work, &zst1, p1.raw_size, usr1, Some("-comp zstd"))?;
    let usr4 = (p4.raw_size + 64 * MIB).next_multiple_of(MIB);
    let (disk4, root4) = host(&work, "host4", usr4, &key, &srv.url())?;
    std::fs::write(
        root4.join("etc/nimbus/update.conf"),
        format!(
            "GROUP=bench4\nSERVER={}\nIO_WRITE_BPS=unlimited\nIO_CLASS=best-effort\n",
            srv.url()
        ),
    )?;
    let (engine4, rss4) = run_engine(&bin, &root4, &disk4)?;

    // Idle daemon: started, socket open, nothing to do.
    let sock = work.join("idle.sock");
    let _ = std::fs::remove_file(&sock);
    let mut d = Command::new(&bin)
        .args(["--first-check", "3600", "--root"])
        .arg(&root4)
        .arg("--disk")
        .arg(&disk4)
        .arg("--socket")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()?;
    let t0 = Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let idle = vm_kib(d.id(), "VmRSS:").unwrap_or(0);
    let _ = d.kill();
    let _ = d.wait();
    std::fs::remove_file(&disk4)?;

    let raw_mb = p1.raw_size as f64 / 1e6;
    let vs_pipeline = pipeline / engine1;
    let vs_rauc = rauc / engine1;
    let vs_decode = decode / engine1;
    let mib = |k: u64| k.div_ceil(1024);
    let mut t = String::new();
    writeln!(t, "# bench update\n")?;
    writeln!(t, "Machine: {}. Payload: {:.0} MB raw (USR-A of the built image repeated to 1 GiB, sealed with verity + descriptor), zstd -{level} in 32 MiB frames = {:.0} MB; served over loopback HTTP; slot = sparse file on the same disk. Each row is the median of 3 runs, each after reading its input once. Command: `cargo xtask bench update`.\n", crate::bench::common::machine(), raw_mb, p1.compressed as f64 / 1e6)?;
    writeln!(t, "| what | seconds | MB/s (raw) | vs update-engine |")?;
    writeln!(t, "|---|---|---|---|")?;
    writeln!(t, "| update-engine --once (download, 2x sha256, decode, O_DIRECT write, verify, flip) | {engine1:.2} | {:.0} | 1.00 |", raw_mb / engine1)?;
    writeln!(t, "| shell pipeline: curl \\| tee >(sha256sum) \\| zstd -d \\| tee >(sha256sum) \\| dd iflag=fullblock oflag=direct | {pipeline:.2} | {:.0} | {vs_pipeline:.2}x slower |", raw_mb / pipeline)?;
    writeln!(t, "| decode-only limit: zstd -d -c > /dev/null | {decode:.2} | {:.0} | engine reaches {vs_decode:.2} of it |", raw_mb / decode)?;
    writeln!(t, "| RAUC 1.8 (Debian): `rauc install` of a plain bundle of the same raw slot image (`rauc bundle` defaults: squashfs, gzip) into a loop-device slot; `rauc service` on a private D-Bus session bus, bootloader=noop | {rauc:.2} | {:.0} | {vs_rauc:.2}x slower |", raw_mb / rauc)?;
    writeln!(t, "| the same with the bundle made `--mksquashfs-args=\"-comp zstd\"` (RAUC's fastest decode) | {rauc_zstd:.2} | {:.0} | {:.2}x slower |", raw_mb / rauc_zstd, rauc_zstd / engine1)?;
    writeln!(t, "\n| memory | MiB |\n|---|---|")?;
    writeln!(t, "| peak RSS, 1 GiB payload | {} |", mib(rss1))?;
    writeln!(
        t,
        "| peak RSS, 4 GiB payload (zstd -3, same 8 MiB window; {engine4:.1} s) | {} |",
        mib(rss4)
    )?;
    writeln!(t, "| idle daemon RSS | {} |", mib(idle))?;
    writeln!(t, "\nTargets: >= 3x the shell pipeline, >= 4x RAUC, >= 0.85x decode-only, peak RSS <= 32 MiB and equal for 1 and 4 GiB, idle <= 10 MiB.")?;
    print!("{t}");
    std::fs::write(root.join("docs/bench-update.md"), &t)?;
    println!(
        "update-apply: vs_pipeline={vs_pipeline:.2} vs_decode={vs_decode:.2} peak_rss_mib={} peak_rss_mib_4g={} idle_rss_mib={} vs_rauc={vs_rauc:.2}",
        mib(rss1),
        mib(rss4),
        mib(idle)
    );
    Ok(std::process::ExitCode::SUCCESS)
}
