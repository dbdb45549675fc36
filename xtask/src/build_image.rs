//! `cargo xtask build-image`.

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use nimbus::layout::DEFAULT_USR_SIZE;
use nimbus_image::pipeline::{self, BuildOptions, Format, Install, UnitFile};
use nimbus_image::rootfs::RootfsSpec;
use nimbus_image::usr::Compression;

use crate::parse_size;

#[derive(Args)]
pub struct BuildImage {
    /// OS version (semver) of the image and its USR slot.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: semver::Version,
    /// Release channel the image follows (GROUP in update.conf).
    #[arg(long, default_value = "stable")]
    channel: String,
    /// Release key directory (release.key); repeat it to sign the USR
    /// descriptor with several keys (as many as the trust set's threshold).
    /// Without it, a development key generated once under
    /// target/nimbus/dev-key is used and the image says so.
    #[arg(long, value_name = "DIR")]
    key: Vec<PathBuf>,
    /// Unix seconds stamped on every file, and part of the rootfs cache
    /// key. Default: SOURCE_DATE_EPOCH, else the last commit's time (the
    /// same checkout builds the same USR).
    #[arg(long, value_name = "SECONDS")]
    epoch: Option<u64>,
    /// The trust set the image carries in USR and stage 1 (docs/formats.md,
    /// "Trust set"), e.g. the newest `trust/<n>.json` of the release
    /// repository. Default: the --key keys, threshold 1, version 1.
    #[arg(long, value_name = "FILE")]
    trust: Option<PathBuf>,
    /// Size of each USR partition (fixed for the life of a host: leave room to grow).
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_USR_SIZE)]
    usr_size: u64,
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    disk_size: u64,
    /// #cloud-config (or #! script) to place on the OEM partition as user-data.
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// A file to place in the OEM partition's root (at /oem/NAME on the
    /// host). Repeatable.
    #[arg(long, value_name = "FILE")]
    oem_file: Vec<PathBuf>,
    /// Comma-separated: raw, qcow2, box.
    #[arg(long, value_delimiter = ',', default_value = "raw,qcow2,box")]
    formats: Vec<Format>,
    /// Output directory (default target/nimbus/<version>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// USR filesystem compression: none, lz4, lz4hc (see docs/image.md for the figures).
    #[arg(long, default_value = "none")]
    usr_compression: Compression,
    /// zstd level of the update payload.
    #[arg(long, default_value_t = 6)]
    zstd_level: i32,
    /// Update server written to /usr/share/nimbus/update.conf (or "disabled").
    #[arg(long, default_value = "disabled")]
    server: String,
    /// Site units baked into USR: every file under DIR goes to
    /// /usr/lib/systemd/system with its relative path (so `foo.service.d/x.conf`
    /// is a drop-in), enabled from its [Install] section. Repeatable.
    #[arg(long, value_name = "DIR")]
    extra_units: Vec<PathBuf>,
    /// More Debian packages for the image (comma-separated), on top of the
    /// default set; they change the rootfs cache key.
    #[arg(long, value_delimiter = ',', value_name = "PKG")]
    extra_packages: Vec<String>,
}

struct Bars {
    tty: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl pipeline::Progress for Bars {
    fn start(&mut self, stage: &str) {
        if self.tty {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.set_message(stage.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            self.bar = Some(b);
        } else {
            eprintln!("build-image: {stage} ...");
        }
    }
    fn finish(&mut self, stage: &str, seconds: f64, note: &str) {
        let line = format!("build-image: {stage} done in {seconds:.1} s {note}");
        match self.bar.take() {
            Some(b) => b.finish_with_message(line),
            None => eprintln!("{line}"),
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn source_date_epoch(root: &Path) -> u64 {
    if let Some(e) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return e;
    }
    // The last commit's time: the same checkout builds the same USR.
    Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Where cargo puts what it builds for this checkout: `CARGO_TARGET_DIR`
/// when set (relative to the checkout, as cargo reads it), else `target/`.
pub fn cargo_target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

/// Build Nimbus's own binaries in release mode and list them for /usr/bin.
fn nimbus_binaries(root: &Path) -> anyhow::Result<Vec<Install>> {
    let bins = [
        ("nimbus-cloud-config", "cloud-config"),
        ("nimbus-updater", "update-engine"),
        ("nimbus-updater", "updatectl"),
        ("nimbus-swarm", "nimbus-swarm"),
    ];
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--release", "--quiet"]);
    for (pkg, bin) in bins {
        cmd.args(["-p", pkg, "--bin", bin]);
    }
    let status = cmd.status().context("cargo build --release")?;
    if !status.success() {
        bail!("building Nimbus's binaries failed ({status})");
    }
    Ok(bins
        .iter()
        .map(|(_, bin)| Install {
            dest: format!("/usr/bin/{bin}"),
            source: cargo_target_dir(root).join("release").join(bin),
            mode: 0o755,
        })
        .collect())
}

/// The boot selector runs as /init before any library is reachable, so it
/// is linked statically (glibc's libc.a; no NSS is used). An explicit
/// --target keeps the static flag off build scripts and host tools.
pub fn nimbus_init(root: &Path) -> anyhow::Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "nimbus-init",
            "--bin",
            "nimbus-init",
            "--target",
            TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("cargo build nimbus-init")?;
    if !status.success() {
        bail!("building nimbus-init failed ({status})");
    }
    Ok(cargo_target_dir(root)
        .join(TARGET)
        .join("release/nimbus-init"))
}

/// Files under `dir`, as (path relative to `dir`, path), sorted.
fn files_under(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .with_context(|| p.display().to_string())?
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn extra_units(dirs: &[PathBuf]) -> anyhow::Result<Vec<UnitFile>> {
    let mut out = Vec::new();
    for dir in dirs {
        let files = unit_files(dir).with_context(|| format!("--extra-units {}", dir.display()))?;
        if files.is_empty() {
            bail!("--extra-units {}: no files in it", dir.display());
        }
        out.extend(files);
    }
    Ok(out)
}

/// The units and drop-ins (`x.service.d/10-y.conf`) under `dir`.
fn unit_files(dir: &Path) -> anyhow::Result<Vec<UnitFile>> {
    files_under(dir)?
        .into_iter()
        .map(|(name, p)| {
            Ok(UnitFile {
                name,
                content: std::fs::read_to_string(&p).with_context(|| p.display().to_string())?,
            })
        })
        .collect()
}

fn units(root: &Path) -> anyhow::Result<Vec<UnitFile>> {
    let mut out = Vec::new();
    for dir in [
        "cloud-config/units",
        "image/units",
        "updater/units",
        "swarm/units",
    ] {
        out.extend(unit_files(&root.join(dir)).with_context(|| dir.to_string())?);
    }
    Ok(out)
}

/// target/nimbus/dev-key, made on first use. Builds run side by side (the
/// test binaries start several at once on a fresh checkout), so the key is
/// made whole in a private directory and renamed into place: the first
/// rename wins, every other build drops its own key and signs with the
/// winner's, and no build ever signs with a key that is then replaced.
fn ensure_dev_key(target: &Path) -> anyhow::Result<PathBuf> {
    let d = target.join("dev-key");
    if d.join(nimbus::keys::SECRET_FILE).exists() {
        return Ok(d);
    }
    fs::create_dir_all(target).with_context(|| target.display().to_string())?;
    let tmp = tempfile::Builder::new()
        .prefix(".dev-key-")
        .tempdir_in(target)
        .with_context(|| target.display().to_string())?;
    let k = nimbus::keys::ReleaseKey::generate()?;
    k.write_to_dir(tmp.path())?;
    match fs::rename(tmp.path(), &d) {
        Ok(()) => {
            nimbus::durable::sync_dir(target)?;
            eprintln!(
                "build-image: generated development key {} in {}",
                k.id,
                d.display()
            );
        }
        // Another build's key got there first (a non-empty directory).
        Err(_) if d.join(nimbus::keys::SECRET_FILE).exists() => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("rename {} to {}", tmp.path().display(), d.display()))
        }
    }
    Ok(d)
}

/// Turn the command line into build options: key, epoch, units, cheap
/// checks, then the release build of Nimbus's binaries.
pub fn prepare(a: BuildImage) -> anyhow::Result<BuildOptions> {
    let root = workspace_root();
    let target = root.join("target/nimbus");
    let (key_dirs, dev_key) = match a.key {
        k if !k.is_empty() => (k, false),
        _ => (vec![ensure_dev_key(&target)?], true),
    };
    let epoch = a.epoch.unwrap_or_else(|| source_date_epoch(&root));
    let out = a.out.unwrap_or_else(|| target.join(a.version.to_string()));
    let mut opts = BuildOptions {
        version: a.version,
        channel: a.channel,
        key_dirs,
        trust: a.trust,
        dev_key,
        usr_size: a.usr_size,
        disk_size: a.disk_size,
        user_data: a.user_data,
        oem_files: a.oem_file,
        formats: a.formats,
        out,
        cache: target.join("cache"),
        epoch,
        compression: a.usr_compression,
        zstd_level: a.zstd_level,
        server: a.server,
        installs: Vec::new(),
        units: {
            let mut u = units(&root)?;
            u.extend(extra_units(&a.extra_units)?);
            u
        },
        stage1_init: None,
        rootfs: {
            let mut r = RootfsSpec::default_for(epoch);
            for p in &a.extra_packages {
                if p.is_empty()
                    || !p.bytes().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(&c)
                    })
                {
                    bail!("--extra-packages: {p:?} is not a Debian package name");
                }
                if !r.packages.contains(p) {
                    r.packages.push(p.clone());
                }
            }
            r
        },
        keep_work: false,
    };
    // Cheap checks first, so a typo fails in a second, not after a build.
    pipeline::preflight(&opts)?;
    // The root filesystem does not depend on Nimbus's binaries: mmdebstrap
    // (downloads, dpkg) fills its cache while cargo compiles them, instead
    // of after (a cold build saves about a minute). The build itself takes
    // it from the cache, or makes it again if this failed.
    let prefetch = {
        let (spec, cache) = (opts.rootfs.clone(), opts.cache.clone());
        std::thread::spawn(move || {
            nimbus_image::rootfs::obtain(&spec, &cache, &cache.join("rootfs-prefetch.log"))
        })
    };
    let binaries = nimbus_binaries(&root);
    match prefetch.join() {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("build-image: root filesystem ahead of the build: {e} (the build tries again)"),
        Err(_) => eprintln!("build-image: root filesystem ahead of the build: the thread panicked (the build tries again)"),
    }
    opts.installs = binaries?;
    // update-engine's default hooks (docs/cluster.md): the swarm drain and
    // reactivation, and etcd's leadership moved off a host about to reboot.
    for dir in ["swarm/hooks", "updater/hooks"] {
        for (rel, source) in files_under(&root.join(dir))? {
            opts.installs.push(Install {
                dest: format!("/{}/{rel}", nimbus::paths::HOOKS_USR),
                source,
                mode: 0o755,
            });
        }
    }
    // The system bus's policy for update-engine's D-Bus name: the bus
    // refuses to let root own com.coreos.update1 without it.
    opts.installs.push(Install {
        dest: "/usr/share/dbus-1/system.d/com.coreos.update1.conf".into(),
        source: root.join("updater/dbus/com.coreos.update1.conf"),
        mode: 0o644,
    });
    // Nimbus's commands written as scripts (toolbox: docs/toolbox.md).
    for (rel, source) in files_under(&root.join("image/bin"))? {
        opts.installs.push(Install {
            dest: format!("/usr/bin/{rel}"),
            source,
            mode: 0o755,
        });
    }
    // Run by systemd-shutdown just before the kernel reboots.
    for (rel, source) in files_under(&root.join("image/system-shutdown"))? {
        opts.installs.push(Install {
            dest: format!("/usr/lib/systemd/system-shutdown/{rel}"),
            source,
            mode: 0o755,
        });
    }
    let init = nimbus_init(&root)?;
    opts.installs.push(Install {
        dest: "/usr/lib/nimbus/nimbus-init".into(),
        source: init.clone(),
        mode: 0o755,
    });
    opts.stage1_init = Some(init);
    Ok(opts)
}

pub fn run(a: BuildImage) -> anyhow::Result<ExitCode> {
    let opts = prepare(a)?;
    let r = build(&opts)?;
    println!("{}", opts.out.display());
    eprintln!(
        "build-image: {} {} in {:.1} s (USR {} MiB, payload {} MiB, verity root {})",
        r.version,
        if r.rootfs_cache == "hit" {
            "(rootfs cached)"
        } else {
            ""
        },
        r.total_seconds,
        r.usr_data_size >> 20,
        r.payload.compressed_size >> 20,
        r.verity_root
    );
    Ok(ExitCode::SUCCESS)
}

/// Build through the image cache (`image_cache.rs`): an image whose
/// inputs were built before is copied, not built again.
pub fn build(opts: &BuildOptions) -> anyhow::Result<pipeline::BuildReport> {
    crate::image_cache::build_cached(opts, |o| {
        let mut bars = Bars {
            tty: std::io::stderr().is_terminal(),
            bar: None,
        };
        Ok(pipeline::build(o, &mut bars)?)
    })
}

/// Parse build-image flags from a list, for other commands (bench).
pub fn parse(args: &[&str]) -> BuildImage {
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        b: BuildImage,
    }
    <Wrap as clap::Parser>::parse_from(std::iter::once("build-image").chain(args.iter().copied())).b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight builds starting together on a fresh target all sign with the
    /// one key left on disk (a CI run signed with a key another build then
    /// replaced, and its image failed verification).
    #[test]
    fn builds_started_together_agree_on_one_dev_key() {
        let t = tempfile::tempdir().unwrap();
        let barrier = std::sync::Barrier::new(8);
        let ids: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let d = ensure_dev_key(t.path()).unwrap();
                        nimbus::keys::ReleaseKey::load_dir(&d)
                            .unwrap()
                            .id
                            .to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = nimbus::keys::ReleaseKey::load_dir(&t.path().join("dev-key"))
            .unwrap()
            .id
            .to_string();
        assert!(ids.iter().all(|i| *i == on_disk), "{ids:?} vs {on_disk}");
        let left: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("dev-key")]);
    }
}
