//! `cargo xtask bench delta`: how much of a full payload a delta update
//! fetches for realistic changes, built with the project's own builder:
//! (a) one Debian package added, (b) only Nimbus's own binaries rebuilt
//! (a one-line change: a different build tag), (c) N -> N+2 with both.
//! Each target is applied in host mode to a copy of N's disk by the release
//! build of update-engine over loopback HTTP, by delta and (the baseline,
//! same run, same target) from the full payload.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::bench::update::run_engine;
use crate::{build_image, httpd};

/// A package with a few dependencies of its own: what "install one more
/// tool" looks like.
const PACKAGE: &str = "strace";

struct Build {
    dir: PathBuf,
    key_dir: PathBuf,
}

fn build(work: &Path, version: &str, extra: &[&str], tag: &str) -> anyhow::Result<Build> {
    // The binaries are built by cargo inside build-image, which inherits
    // this: a different tag is a one-line change to every binary.
    std::env::set_var("NIMBUS_BUILD_TAG", tag);
    eprintln!("bench delta: building {version} {extra:?} (build tag {tag:?}) ...");
    let (out, opts) = crate::vm::e2e::build(work, version, extra)?;
    std::env::remove_var("NIMBUS_BUILD_TAG");
    Ok(Build {
        dir: out,
        key_dir: opts.key_dirs[0].clone(),
    })
}

struct Run {
    seconds: f64,
    rss_kib: u64,
    fetched: u64,
    requests: usize,
    mode: String,
}

/// Apply `channel` to a fresh copy of N's disk; what it fetched.
fn apply(
    bin: &Path,
    work: &Path,
    n: &Build,
    srv: &httpd::Httpd,
    channel: &str,
) -> anyhow::Result<Run> {
    let host = work.join("host");
    let _ = std::fs::remove_dir_all(&host);
    nimbus_testkit::host::root(
        &host.join("root"),
        &std::fs::read(n.dir.join("trust.json"))?,
        &format!(
            "GROUP={channel}\nSERVER={}\nIO_WRITE_BPS=unlimited\nIO_CLASS=best-effort\n",
            srv.url()
        ),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let disk = host.join("disk.raw");
    let st = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(n.dir.join("nimbus.raw"))
        .arg(&disk)
        .status()?;
    if !st.success() {
        bail!("copying N's disk");
    }
    // The same cache state for both modes: N's disk just copied (hot), the
    // repository's files read once.
    srv.clear_log();
    let (seconds, rss_kib) = run_engine(bin, &host.join("root"), &disk)?;
    let gets: Vec<_> = srv
        .requests()
        .into_iter()
        .filter(|l| {
            l.path.ends_with("usr.pack")
                || l.path.ends_with("usr.index")
                || l.path.ends_with("usr.img.zst")
        })
        .collect();
    let fetched = gets.iter().map(|l| l.body_bytes).sum();
    let mode = if gets.iter().any(|l| l.path.ends_with("usr.img.zst")) {
        "full"
    } else {
        "delta"
    };
    std::fs::remove_dir_all(&host)?;
    Ok(Run {
        seconds,
        rss_kib,
        fetched,
        requests: gets.len(),
        mode: mode.into(),
    })
}

/// Serve `m`'s releases without their delta files on `channel`, signed by
/// `key`: the full-payload baseline of the same release.
pub fn publish_without_delta(
    repo: &Path,
    m: &nimbus::release::Manifest,
    channel: &str,
    key: &nimbus::keys::ReleaseKey,
) -> anyhow::Result<()> {
    let mut fm = m.clone();
    fm.channel = channel.to_string();
    fm.releases.iter_mut().for_each(|r| r.delta = None);
    let bytes = serde_json::to_vec_pretty(&fm)?;
    let path = repo.join(nimbus::repo::manifest_rel(channel));
    std::fs::write(&path, &bytes)?;
    std::fs::write(
        nimbus::repo::sig_path(&path),
        serde_json::to_vec(&nimbus::release::Manifest::sign_bytes(&bytes, &[key]))?,
    )?;
    Ok(())
}

pub fn bench_delta() -> anyhow::Result<std::process::ExitCode> {
    let root = build_image::workspace_root();
    let work = root.join("target/nimbus/bench/delta");
    std::fs::create_dir_all(&work)?;
    let bin = crate::bench::update::release_engine(&root)?;

    let n = build(&work, "1.0.0", &[], "")?;
    let pkg = build(&work, "1.1.0", &["--extra-packages", PACKAGE], "")?;
    let bins = build(&work, "1.1.1", &[], "rebuilt-1")?;
    let both = build(&work, "1.2.0", &["--extra-packages", PACKAGE], "rebuilt-1")?;

    let repo = work.join("repo");
    let _ = std::fs::remove_dir_all(&repo);
    let srv = httpd::Httpd::start(&repo);
    let key = nimbus::keys::ReleaseKey::load_dir(&n.key_dir)?;
    let mut rows = Vec::new();
    for (name, b) in [
        ("one package added (strace)", &pkg),
        ("Nimbus binaries rebuilt", &bins),
        ("N -> N+2: both", &both),
    ] {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(b.dir.join("build.json"))?)?;
        let version = v["version"].as_str().context("version")?.to_string();
        let full_size = v["payload"]["compressed_size"].as_u64().context("size")?;
        let channel = format!("d{}", version.replace('.', "-"));
        let m = nimbus_image::release::publish(&nimbus_image::release::PublishOptions::simple(
            &b.dir,
            &repo,
            &channel,
            &[&key],
        ))?;
        // The baseline: the same release on a channel without delta files.
        let full_channel = format!("{channel}-full");
        publish_without_delta(&repo, &m, &full_channel, &key)?;
        let d = apply(&bin, &work, &n, &srv, &channel)?;
        let f = apply(&bin, &work, &n, &srv, &full_channel)?;
        if d.mode != "delta" || f.mode != "full" {
            bail!(
                "{name}: expected a delta then a full apply, got {} and {}",
                d.mode,
                f.mode
            );
        }
        rows.push((name, full_size, d, f));
    }

    let pct = |r: &Run, full: u64| r.fetched as f64 * 100.0 / full as f64;
    let mut t = String::new();
    writeln!(t, "# bench delta\n")?;
    writeln!(t, "Machine: {}. N = `cargo xtask build-image --version 1.0.0` (the default image); each target built from the same checkout with the change named; applied in host mode by the release update-engine to a copy of N's disk over loopback HTTP, first by delta, then from the full payload (the same release on a channel without delta files). Fetched = every byte of index, pack ranges or payload the server sent. Command: `cargo xtask bench delta`.\n", crate::bench::common::machine())?;
    writeln!(t, "| target | full payload MB | delta fetched MB | % of full | requests | delta s | full s | delta/full time | delta peak RSS MiB | full peak RSS MiB |")?;
    writeln!(t, "|---|---|---|---|---|---|---|---|---|---|")?;
    for (name, full, d, f) in &rows {
        writeln!(
            t,
            "| {name} | {:.1} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {:.2} | {} | {} |",
            *full as f64 / 1e6,
            d.fetched as f64 / 1e6,
            pct(d, *full),
            d.requests,
            d.seconds,
            f.seconds,
            d.seconds / f.seconds,
            d.rss_kib.div_ceil(1024),
            f.rss_kib.div_ceil(1024),
        )?;
    }
    writeln!(t, "\nTargets: one package <= 8 %, binaries <= 5 %, apply time <= the full apply's, peak RSS <= 32 MiB.")?;
    print!("{t}");
    std::fs::write(root.join("docs/bench-delta.md"), &t)?;
    let ratio = rows
        .iter()
        .map(|(_, _, d, f)| d.seconds / f.seconds)
        .fold(0.0, f64::max);
    let rss = rows.iter().map(|(_, _, d, _)| d.rss_kib).max().unwrap_or(0);
    let requests = rows
        .iter()
        .map(|(_, _, d, _)| d.requests)
        .max()
        .unwrap_or(0);
    println!(
        "update-delta: one_package_pct={:.2} binaries_pct={:.2} two_steps_pct={:.2} apply_vs_full={ratio:.2} peak_rss_mib={} requests={requests}",
        pct(&rows[0].2, rows[0].1),
        pct(&rows[1].2, rows[1].1),
        pct(&rows[2].2, rows[2].1),
        rss.div_ceil(1024),
    );
    Ok(std::process::ExitCode::SUCCESS)
}
