//! `cargo xtask bench impact`: does an update disturb the work running on
//! the host? A latency-sensitive workload (fio: 4 KiB random reads and
//! O_SYNC writes at a fixed rate, direct I/O, on a file on the same disk as
//! the slot) is measured idle, while update-engine applies a 1 GiB full
//! payload and a delta again and again under the default I/O policy, and
//! while it applies the full payload with the cap off. Then the network
//! cap: DOWNLOAD_RATE_MAX against the rate the server saw.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use nimbus::layout::{Slot, MIB};

use crate::bench::update::{payload_with, run_engine, source_fs};
use crate::httpd;

const GIB: u64 = 1 << 30;
/// Seconds of workload per scenario.
const SECS: u64 = 20;
/// The workload's rate: reads and writes per second each.
const IOPS: u32 = 100;
/// The network cap checked (bytes per second).
const NET_CAP: u64 = 20 << 20;

#[derive(Debug, Clone, Copy)]
struct Lat {
    p50_us: f64,
    p99_us: f64,
    ios: u64,
}

/// fio's completion latencies for reads and writes.
fn fio(file: &Path, secs: u64) -> anyhow::Result<(Lat, Lat)> {
    let out = Command::new("fio")
        .args([
            "--name=probe",
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--direct=1",
            "--sync=1",
            "--ioengine=psync",
            "--size=256M",
            &format!("--rate_iops={IOPS},{IOPS}"),
            "--time_based",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .output()
        .context("fio (`cargo xtask deps` installs it)")?;
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    // fio may print notices before its JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').context("fio printed no JSON")?..];
    let v: serde_json::Value = serde_json::from_str(json)?;
    let job = &v["jobs"][0];
    let lat = |dir: &str| -> anyhow::Result<Lat> {
        let p = &job[dir]["clat_ns"]["percentile"];
        let get = |k: &str| {
            p[k].as_f64()
                .with_context(|| format!("fio {dir} percentile {k}"))
        };
        Ok(Lat {
            p50_us: get("50.000000")? / 1000.0,
            p99_us: get("99.000000")? / 1000.0,
            ios: job[dir]["total_ios"].as_u64().unwrap_or(0),
        })
    };
    Ok((lat("read")?, lat("write")?))
}

/// Write the payload (decoded) into USR-A of `disk`: body from the start,
/// descriptor in the partition's last 4 KiB.
fn write_slot_a(disk: &Path, zst: &Path, raw_size: u64) -> anyhow::Result<()> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let d = nimbus::gpt::Disk::open_path(disk, true)?;
    let p = d.partition(Slot::A.partition_number())?;
    let f = d.into_device();
    let mut dec = Command::new("zstd")
        .args(["-q", "-d", "-c"])
        .arg(zst)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("zstd")?;
    let mut out = dec.stdout.take().context("zstd stdout")?;
    let body = raw_size - 4096;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < body {
        let n = ((body - off) as usize).min(buf.len());
        out.read_exact(&mut buf[..n])?;
        f.write_all_at(&buf[..n], p.offset_bytes() + off)?;
        off += n as u64;
    }
    let mut desc = [0u8; 4096];
    out.read_exact(&mut desc)?;
    f.write_all_at(&desc, p.offset_bytes() + p.size_bytes() - 4096)?;
    drop(out);
    dec.wait()?;
    f.sync_all()?;
    Ok(())
}

fn invalidate_b(disk: &Path) -> anyhow::Result<()> {
    let mut d = nimbus::gpt::Disk::open_path(disk, true)?;
    d.update_slots(|t| nimbus::slots::invalidate(t, Slot::B.partition_number()))?;
    Ok(())
}

fn conf(root: &Path, channel: &str, server: &str, extra: &str) -> anyhow::Result<()> {
    std::fs::write(
        root.join("etc/nimbus/update.conf"),
        format!("GROUP={channel}\nSERVER={server}\n{extra}"),
    )?;
    Ok(())
}

struct Scenario {
    name: &'static str,
    read: Lat,
    write: Lat,
    updates: u32,
}

pub fn bench_impact() -> anyhow::Result<std::process::ExitCode> {
    let root = crate::build_image::workspace_root();
    let work = root.join("target/nimbus/bench/impact");
    std::fs::create_dir_all(&work)?;
    let bin = crate::bench::update::release_engine(&root)?;
    let key = crate::bench::update::bench_key(&work)?;
    let src = source_fs(&root, &root.join("target/nimbus/bench/update"))?;
    let n = payload_with(&work, &src, "1.0.0", GIB, 6, &key, None)?;
    // N+1: the same data but 4 MiB rewritten, as a changed package.
    let n1 = payload_with(&work, &src, "1.0.1", GIB, 6, &key, Some(300 << 20))?;

    let repo = work.join("repo");
    let _ = std::fs::remove_dir_all(&repo);
    let srv = httpd::Httpd::start(&repo);
    let m = nimbus_image::release::publish(&nimbus_image::release::PublishOptions::simple(
        &n1.dir,
        &repo,
        "impact",
        &[&key],
    ))?;
    crate::bench::delta::publish_without_delta(&repo, &m, "impact-full", &key)?;

    // The host: USR-A holds N, USR-B is the passive slot.
    let usr = (n1.raw_size + 64 * MIB).next_multiple_of(MIB);
    let host = work.join("host");
    let _ = std::fs::remove_dir_all(&host);
    // update.conf is written per scenario by `conf`.
    let hroot = nimbus_testkit::host::root(
        &host.join("root"),
        &nimbus::trust::TrustDoc::initial([key.public()], 1).to_bytes(),
        "",
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let disk = crate::bench::update::empty_host_disk(&host.join("disk.raw"), usr)?;
    write_slot_a(&disk, &n.dir.join("usr.img.zst"), n.raw_size)?;

    let probe = work.join("probe.dat");
    // Lay the workload's file out once, outside any measurement.
    fio(&probe, 1)?;

    let url = srv.url();
    let run_while = |channel: &str, extra: &str, name: &'static str| -> anyhow::Result<Scenario> {
        conf(&hroot, channel, &url, extra)?;
        let stop = AtomicBool::new(false);
        let mut updates = 0u32;
        let (read, write) = std::thread::scope(|s| -> anyhow::Result<(Lat, Lat)> {
            let looper = s.spawn(|| -> anyhow::Result<u32> {
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    invalidate_b(&disk)?;
                    run_engine(&bin, &hroot, &disk)?;
                    k += 1;
                }
                Ok(k)
            });
            // Let the first update start before measuring.
            std::thread::sleep(Duration::from_millis(500));
            let r = fio(&probe, SECS);
            stop.store(true, Ordering::Relaxed);
            updates = looper
                .join()
                .map_err(|_| anyhow::anyhow!("update loop panicked"))??;
            r
        })?;
        Ok(Scenario {
            name,
            read,
            write,
            updates,
        })
    };

    eprintln!("bench impact: idle ...");
    let (ir, iw) = fio(&probe, SECS)?;
    let idle = Scenario {
        name: "idle",
        read: ir,
        write: iw,
        updates: 0,
    };
    eprintln!("bench impact: full updates, default I/O policy ...");
    let full = run_while(
        "impact-full",
        "",
        "full update, default policy (IO_WRITE_BPS=16M, IO_CLASS=idle)",
    )?;
    eprintln!("bench impact: delta updates, default I/O policy ...");
    let delta = run_while("impact", "", "delta update, default policy")?;
    eprintln!("bench impact: full updates, 64 MB/s ...");
    let low = run_while(
        "impact-full",
        "IO_WRITE_BPS=64M\n",
        "full update, IO_WRITE_BPS=64M (the default before 2026-12-01), IO_CLASS=idle",
    )?;
    eprintln!("bench impact: full updates, cap off ...");
    let off = run_while(
        "impact-full",
        "IO_WRITE_BPS=unlimited\nIO_CLASS=best-effort\n",
        "full update, cap off (IO_WRITE_BPS=unlimited, IO_CLASS=best-effort)",
    )?;

    // The network cap, alone.
    eprintln!("bench impact: DOWNLOAD_RATE_MAX ...");
    conf(
        &hroot,
        "impact-full",
        &url,
        &format!("IO_WRITE_BPS=unlimited\nDOWNLOAD_RATE_MAX={NET_CAP}\n"),
    )?;
    invalidate_b(&disk)?;
    srv.clear_log();
    run_engine(&bin, &hroot, &disk)?;
    let get = srv
        .requests()
        .into_iter()
        .find(|l| l.path.ends_with("usr.img.zst"))
        .context("no payload GET under the network cap")?;
    let rate = get.body_bytes as f64 / get.secs;
    let net_err = (rate - NET_CAP as f64).abs() * 100.0 / NET_CAP as f64;
    std::fs::remove_dir_all(&host)?;

    let ratio = |s: &Scenario, f: fn(&Scenario) -> f64| f(s) / f(&idle);
    let p99 = |s: &Scenario| s.read.p99_us.max(s.write.p99_us);
    let mut t = String::new();
    writeln!(t, "# bench impact\n")?;
    writeln!(t, "Machine: {}. Workload: fio, 4 KiB random reads and O_SYNC writes, {IOPS}/s each, direct I/O, on a 256 MiB file on the same disk as the slot, {SECS} s per row. Updates: update-engine (release) applying a 1 GiB slot (USR-A's data repeated; N+1 = N with 4 MiB rewritten) to the passive slot of a disk image on that disk, again and again for the whole row. Command: `cargo xtask bench impact`.\n", crate::bench::common::machine())?;
    writeln!(t, "| scenario | updates applied | read p50 us | read p99 us | write p50 us | write p99 us | p50 ratio | p99 ratio |")?;
    writeln!(t, "|---|---|---|---|---|---|---|---|")?;
    for s in [&idle, &full, &delta, &low, &off] {
        let p50 = |s: &Scenario| s.read.p50_us.max(s.write.p50_us);
        writeln!(
            t,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            s.name,
            s.updates,
            s.read.p50_us,
            s.read.p99_us,
            s.write.p50_us,
            s.write.p99_us,
            ratio(s, p50),
            ratio(s, p99),
        )?;
    }
    writeln!(t, "\nRatios are against the idle row, taking the worse of reads and writes. fio completed {} reads and {} writes idle.", idle.read.ios, idle.write.ios)?;
    writeln!(t, "\nNetwork: DOWNLOAD_RATE_MAX={} MiB/s; the server sent {:.1} MB in {:.2} s = {:.2} MiB/s ({net_err:.1} % off).", NET_CAP >> 20, get.body_bytes as f64 / 1e6, get.secs, rate / MIB as f64)?;
    writeln!(
        t,
        "\nTargets: p99 ratio under the default policy <= 1.5; the network cap within 10 %."
    )?;
    print!("{t}");
    std::fs::write(root.join("docs/bench-impact.md"), &t)?;
    println!(
        "update-impact: p99_ratio_capped={:.2} p99_ratio_uncapped={:.2} net_cap_error_pct={net_err:.1} p99_ratio_delta={:.2} p99_ratio_64m={:.2}",
        ratio(&full, p99),
        ratio(&off, p99),
        ratio(&delta, p99),
        ratio(&low, p99),
    );
    Ok(std::process::ExitCode::SUCCESS)
}
