//! A content-addressed cache of built images under
//! `target/nimbus/image-cache/<key>/`, shared by every test binary and
//! xtask command of a run (and of later runs on the same checkout).
//!
//! The key is a SHA-256 over everything that goes into an image: the build
//! options (version, channel, sizes, formats, compression, server, epoch),
//! the bytes of every input file (signing keys, trust set, user-data, OEM
//! files, the binaries installed into USR, stage 1's /init), the unit
//! files, the root filesystem's recipe, and the xtask executable itself,
//! which holds the image pipeline's code: a change to any of them is a new
//! key. A hit copies the cached artifacts into `--out` (copies, never
//! links: tests boot and corrupt their images).
//!
//! An exclusive `flock` on `image-cache/.lock` is held from the look-up to
//! the end of a build, so concurrent processes wanting the same image build
//! it once and the others find it; entries appear by rename, whole or not
//! at all. The oldest entries beyond [`KEEP`] are removed.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nimbus_image::pipeline::{BuildOptions, BuildReport};
use sha2::{Digest, Sha256};

use crate::ledger;

/// Entries kept (each holds a raw, qcow2 and box image and a payload:
/// up to 2 GiB).
const KEEP: usize = 10;

fn hash_file(h: &mut Sha256, p: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(p).with_context(|| format!("{}: hashing", p.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n: u64 = 0;
    loop {
        let got = f.read(&mut buf).with_context(|| p.display().to_string())?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
    // Length-delimited, so two inputs cannot run together.
    h.update(n.to_le_bytes());
    Ok(())
}

fn field(h: &mut Sha256, name: &str, value: &str) {
    h.update((name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update((value.len() as u64).to_le_bytes());
    h.update(value.as_bytes());
}

/// Files directly in `dir`, sorted by name.
fn dir_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let p = e?.path();
        if p.is_file() {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// The cache key of `o`: hex SHA-256 of every input of the build.
pub fn key(o: &BuildOptions) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    field(&mut h, "schema", "nimbus image cache 1");
    field(&mut h, "version", &o.version.to_string());
    field(&mut h, "channel", &o.channel);
    field(&mut h, "dev_key", &o.dev_key.to_string());
    field(&mut h, "usr_size", &o.usr_size.to_string());
    field(&mut h, "disk_size", &o.disk_size.to_string());
    field(&mut h, "formats", &format!("{:?}", o.formats));
    field(&mut h, "epoch", &o.epoch.to_string());
    field(&mut h, "compression", &format!("{:?}", o.compression));
    field(&mut h, "zstd_level", &o.zstd_level.to_string());
    field(&mut h, "server", &o.server);
    field(&mut h, "rootfs", &serde_json::to_string(&o.rootfs)?);
    for d in &o.key_dirs {
        field(&mut h, "key_dir", "");
        for f in dir_files(d)? {
            field(
                &mut h,
                "key_file",
                &f.file_name().unwrap_or_default().to_string_lossy(),
            );
            hash_file(&mut h, &f)?;
        }
    }
    if let Some(t) = &o.trust {
        field(&mut h, "trust", "");
        hash_file(&mut h, t)?;
    }
    if let Some(u) = &o.user_data {
        field(&mut h, "user_data", "");
        hash_file(&mut h, u)?;
    }
    for f in &o.oem_files {
        field(
            &mut h,
            "oem_file",
            &f.file_name().unwrap_or_default().to_string_lossy(),
        );
        hash_file(&mut h, f)?;
    }
    for i in &o.installs {
        field(&mut h, "install", &format!("{} {:o}", i.dest, i.mode));
        hash_file(&mut h, &i.source)?;
    }
    for u in &o.units {
        field(&mut h, "unit", &u.name);
        field(&mut h, "content", &u.content);
    }
    if let Some(s) = &o.stage1_init {
        field(&mut h, "stage1_init", "");
        hash_file(&mut h, s)?;
    }
    // The pipeline's own code is compiled into this executable. Through
    // /proc/self/exe: the running file, even if a rebuild has replaced the
    // one at its path since.
    field(&mut h, "pipeline", "");
    hash_file(&mut h, Path::new("/proc/self/exe"))?;
    Ok(hex::encode(h.finalize()))
}

fn read_report(dir: &Path) -> anyhow::Result<BuildReport> {
    let p = dir.join("build.json");
    let b = std::fs::read(&p).with_context(|| p.display().to_string())?;
    serde_json::from_slice(&b).with_context(|| format!("{}: not a build report", p.display()))
}

/// Remove the least recently used entries beyond [`KEEP`], and what a
/// build killed midway left: the caller holds the cache lock, so no
/// `.building-*` directory belongs to a live build, and an entry without
/// its `used` mark was never finished.
fn evict(cache: &Path) {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return;
    };
    let dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    let (left, dirs): (Vec<PathBuf>, Vec<PathBuf>) = dirs.into_iter().partition(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".building-"))
            || !p.join("used").exists()
    });
    for p in left {
        let _ = std::fs::remove_dir_all(p);
    }
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = dirs
        .into_iter()
        .filter_map(|p| {
            let used = std::fs::metadata(p.join("used"))
                .and_then(|m| m.modified())
                .ok()?;
            Some((used, p))
        })
        .collect();
    entries.sort();
    let excess = entries.len().saturating_sub(KEEP);
    for (_, p) in entries.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// Build `o` through the cache: `build` runs only on a miss, into a
/// scratch directory that becomes the entry; the entry is then copied to
/// `o.out`. Benchmarks that keep the work tree bypass it.
pub fn build_cached(
    o: &BuildOptions,
    build: impl FnOnce(&BuildOptions) -> anyhow::Result<BuildReport>,
) -> anyhow::Result<BuildReport> {
    if o.keep_work || std::env::var_os("NIMBUS_NO_IMAGE_CACHE").is_some() {
        ledger::record("build", &format!("{} (uncached)", o.version));
        return build(o);
    }
    let root = crate::build_image::workspace_root();
    let cache = root.join("target/nimbus/image-cache");
    std::fs::create_dir_all(&cache).with_context(|| cache.display().to_string())?;
    let lock_path = cache.join(".lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| lock_path.display().to_string())?;
    eprintln!(
        "build-image: waiting for the image cache lock ({})",
        lock_path.display()
    );
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("{}: flock: {e}", lock_path.display()))?;
    let k = key(o)?;
    let entry = cache.join(&k);
    // `--out` exists from here on, empty when the build fails.
    std::fs::create_dir_all(&o.out).with_context(|| format!("--out {}", o.out.display()))?;
    let report = if entry.join("build.json").is_file() {
        eprintln!("build-image: {} from the image cache ({k})", o.version);
        ledger::record("cache-hit", &format!("{} {k}", o.version));
        read_report(&entry)?
    } else {
        let scratch = cache.join(format!(".building-{k}"));
        let _ = std::fs::remove_dir_all(&scratch);
        let mut inner = o.clone();
        inner.out = scratch.clone();
        let r = build(&inner);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        let r = r?;
        let _ = std::fs::remove_dir_all(&entry);
        std::fs::rename(&scratch, &entry).with_context(|| entry.display().to_string())?;
        ledger::record("build", &format!("{} {k}", o.version));
        r
    };
    std::fs::write(entry.join("used"), b"").with_context(|| entry.display().to_string())?;
    hand_out(&entry, &o.out)?;
    evict(&cache);
    Ok(report)
}

/// Copy an entry's artifacts into `out`, each replacing its namesake by
/// rename: a process still reading the last copy (another test process
/// of the same binary that built into the same `--out` a moment before,
/// now copying the image for its guest) keeps reading that whole file,
/// never one truncated under it and half written again.
fn hand_out(entry: &Path, out: &Path) -> anyhow::Result<()> {
    let stage = tempfile::Builder::new()
        .prefix(".handing-out-")
        .tempdir_in(out)
        .with_context(|| format!("--out {}: a staging directory", out.display()))?;
    nimbus_image::copy_tree(entry, stage.path(), nimbus_image::Metadata::Fresh)
        .with_context(|| format!("--out {}", out.display()))?;
    let _ = std::fs::remove_file(stage.path().join("used"));
    for e in std::fs::read_dir(stage.path()).with_context(|| stage.path().display().to_string())? {
        let e = e.with_context(|| stage.path().display().to_string())?;
        let to = out.join(e.file_name());
        // rename(2) replaces a file atomically but not a non-empty directory.
        if std::fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(&to).with_context(|| to.display().to_string())?;
        }
        std::fs::rename(e.path(), &to).with_context(|| to.display().to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_of_the_last_hand_out_keeps_its_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let (entry, out) = (d.path().join("entry"), d.path().join("out"));
        std::fs::create_dir_all(entry.join("repo")).unwrap();
        std::fs::create_dir_all(out.join("repo")).unwrap();
        std::fs::write(entry.join("nimbus.raw"), vec![7u8; 1 << 20]).unwrap();
        std::fs::write(entry.join("repo/payload"), b"new").unwrap();
        std::fs::write(entry.join("used"), b"").unwrap();
        std::fs::write(out.join("nimbus.raw"), vec![1u8; 3 << 20]).unwrap();
        std::fs::write(out.join("repo/stale"), b"old").unwrap();
        let mut reader = std::fs::File::open(out.join("nimbus.raw")).unwrap();
        hand_out(&entry, &out).unwrap();
        let mut old = Vec::new();
        reader.read_to_end(&mut old).unwrap();
        assert_eq!(
            old,
            vec![1u8; 3 << 20],
            "the open copy changed under its reader"
        );
        assert_eq!(
            std::fs::read(out.join("nimbus.raw")).unwrap(),
            vec![7u8; 1 << 20]
        );
        assert_eq!(std::fs::read(out.join("repo/payload")).unwrap(), b"new");
        assert!(!out.join("repo/stale").exists());
        assert!(!out.join("used").exists());
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".handing-out-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn eviction_keeps_the_newest_and_clears_what_killed_builds_left() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for i in 0..(KEEP + 2) {
            let e = c.join(format!("k{i:02}"));
            std::fs::create_dir_all(&e).unwrap();
            let used = std::fs::File::create(e.join("used")).unwrap();
            used.set_modified(t0 + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        std::fs::create_dir_all(c.join(".building-other")).unwrap();
        std::fs::create_dir_all(c.join("unfinished")).unwrap();
        evict(c);
        let mut left: Vec<String> = std::fs::read_dir(c)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let want: Vec<String> = (2..(KEEP + 2)).map(|i| format!("k{i:02}")).collect();
        assert_eq!(left, want);
    }
}
