//! Publishing a built version into a static release repository
//! (docs/formats.md, "Channel manifest"; docs/update-engine.md, "Publishing"): copy the payload, then write the next
//! signed channel manifest. Everything a client reads is a plain file, so
//! any web server, object store or CDN can serve the directory.
//!
//! Order of writes: payload first (fsynced, renamed into place), signature
//! and manifest last. A client that fetches while a publish is running sees
//! either the old manifest or the new one with its payload already present;
//! the one window (new manifest, old signature file) fails verification and
//! the client retries on its next check, never accepting anything unsigned.
//!
//! A publish may also rotate the trust set (docs/security.md): the new set
//! goes to `trust/<n>.json` (+ `.sig`), signed by the publishing keys, before
//! the payload and the manifest, so a client that sees a manifest signed by
//! new keys can already fetch the set that makes them trusted.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use nimbus::keys::{KeyId, ReleaseKey, TrustStore, VerifyingKey};
use nimbus::release::{Manifest, Release, Rollout, MANIFEST_SCHEMA};
use nimbus::trust::TrustError;
use semver::Version;

use crate::ImageError;

pub struct PublishOptions<'a> {
    /// `target/nimbus/<version>`: holds build.json and usr.img.zst.
    pub from: &'a Path,
    pub repo: &'a Path,
    pub channel: &'a str,
    /// Every key signs the manifest (and the new trust set, if any).
    pub keys: &'a [&'a ReleaseKey],
    /// Publish a new trust set first.
    pub rotation: Option<Rotation>,
    pub now: DateTime<Utc>,
    pub expires_secs: u64,
    pub rollout_secs: Option<u64>,
    /// Kill switch: offer nothing above this version. `None` keeps the
    /// one the channel has (a kill switch must not vanish because the next
    /// publish forgot to repeat it); `clear_max_version` removes it.
    pub max_version: Option<Version>,
    pub clear_max_version: bool,
}

impl<'a> PublishOptions<'a> {
    /// Publish `from` on `channel` now, valid for a day, no rollout, no
    /// rotation, the kill switch kept: what tests and benchmarks need.
    pub fn simple(
        from: &'a Path,
        repo: &'a Path,
        channel: &'a str,
        keys: &'a [&'a ReleaseKey],
    ) -> PublishOptions<'a> {
        PublishOptions {
            from,
            repo,
            channel,
            keys,
            rotation: None,
            now: Utc::now(),
            expires_secs: 86400,
            rollout_secs: None,
            max_version: None,
            clear_max_version: false,
        }
    }
}

/// Changes to the newest trust set of the repository (or, when it has
/// none, to the set the build carries).
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    pub add: Vec<VerifyingKey>,
    pub remove: Vec<KeyId>,
    pub threshold: Option<usize>,
}

#[derive(Debug, serde::Deserialize)]
struct BuildJson {
    version: Version,
    verity_root: String,
    payload: crate::usr::PayloadInfo,
}

fn io_at(p: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: p.to_path_buf(),
        source,
    }
}

pub fn manifest_path(repo: &Path, channel: &str) -> PathBuf {
    repo.join(nimbus::repo::manifest_rel(channel))
}

pub use nimbus::repo::{payload_rel, stage1_rel};

/// The build's stage 1 (`<from>/stage1/`), if it has one, as the manifest
/// will list it.
fn stage1_of(
    from: &Path,
    version: &Version,
) -> Result<Option<nimbus::release::Stage1Files>, ImageError> {
    let dir = from.join("stage1");
    if !dir.is_dir() {
        return Ok(None);
    }
    let file = |name: &str| -> Result<nimbus::release::FileRef, ImageError> {
        let p = dir.join(name);
        Ok(nimbus::release::FileRef {
            path: stage1_rel(version, name),
            size: std::fs::metadata(&p).map_err(io_at(&p))?.len(),
            sha256: crate::sha256_file(&p)?,
        })
    };
    Ok(Some(nimbus::release::Stage1Files {
        kernel: file(nimbus::esp::KERNEL)?,
        initramfs: file(nimbus::esp::INITRAMFS)?,
    }))
}

const INDEX_FILE: &str = "usr.index";
const PACK_FILE: &str = "usr.pack";

/// Make the build's delta files (`<from>/usr.index`, `<from>/usr.pack`)
/// from its payload.
fn delta_of(from: &Path, bj: &BuildJson) -> Result<nimbus::release::DeltaFiles, ImageError> {
    let (index, pack) = crate::delta::write(
        &from.join("usr.img.zst"),
        bj.payload.raw_size,
        &from.join(INDEX_FILE),
        &from.join(PACK_FILE),
        (
            &nimbus::repo::index_rel(&bj.version),
            &nimbus::repo::pack_rel(&bj.version),
        ),
    )?;
    Ok(nimbus::release::DeltaFiles { index, pack })
}

/// Copy `src` to `repo/rel` (fsync, rename, directory fsync), or leave an
/// identical file; a different one is refused: published files are
/// immutable.
fn place_immutable(src: &Path, repo: &Path, rel: &str, sha: &str) -> Result<(), ImageError> {
    let dest = repo.join(rel);
    let dest_dir = dest.parent().unwrap_or(repo);
    std::fs::create_dir_all(dest_dir).map_err(io_at(dest_dir))?;
    if dest.exists() {
        if crate::sha256_file(&dest)? == sha {
            return Ok(());
        }
        return Err(ImageError::Invalid(format!(
            "{} exists with different content; a published payload is immutable",
            dest.display()
        )));
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dest_dir.join(format!(".{name}.tmp"));
    std::fs::copy(src, &tmp).map_err(io_at(&tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, &dest).map_err(io_at(&dest))?;
    nimbus::durable::sync_dir(dest_dir).map_err(|e| ImageError::Invalid(e.to_string()))
}

/// The newest trust set of the repository (each link checked against the
/// one before, from the build's set), else the build's own.
pub fn current_trust(repo: &Path, build: &Path) -> Result<TrustStore, ImageError> {
    let bt = build.join("trust.json");
    let base = nimbus::trust::load(&bt).map_err(|e| ImageError::Invalid(e.to_string()))?;
    let links = nimbus::chain::read(
        &nimbus::chain::PublishDir(repo.to_path_buf()),
        nimbus::repo::TRUST_DIR,
    )
    .map_err(|e| {
        ImageError::Invalid(format!(
            "{}: {e}",
            repo.join(nimbus::repo::TRUST_DIR).display()
        ))
    })?;
    let (sets, err) = nimbus::trust::walk(base, &links);
    if let Some(e) = err {
        return Err(ImageError::Invalid(format!(
            "{}: the repository's trust chain does not follow from the build's trust set ({}): {e}",
            repo.join("trust").display(),
            bt.display()
        )));
    }
    // Invariant: walk returns at least the base set.
    Ok(sets.last().cloned().unwrap_or_else(|| unreachable!()))
}

fn sign_json(bytes: &[u8], keys: &[&ReleaseKey]) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(&Manifest::sign_bytes(bytes, keys))
        .map_err(|e| ImageError::Invalid(e.to_string()))
}

/// Make, check and write the next trust set; returns it.
fn rotate(
    o: &PublishOptions<'_>,
    current: &TrustStore,
    r: &Rotation,
) -> Result<TrustStore, ImageError> {
    let doc = nimbus::trust::rotate(current, &r.add, &r.remove, r.threshold)
        .map_err(|e| ImageError::Invalid(format!("trust rotation: {e}")))?;
    // Stricter than a host: each added key signs, proving it is held and
    // was not mistyped before any host is asked to trust it.
    for k in &r.add {
        let id = KeyId::of(k);
        if !o.keys.iter().any(|s| s.id == id) {
            return Err(ImageError::Invalid(format!(
                "trust rotation adds key {id} but it did not sign: pass its --key so the new keys sign as well"
            )));
        }
    }
    let bytes = doc.to_bytes();
    let sigs = sign_json(&bytes, o.keys)?;
    // The same check every host makes: vouched for by the current set's
    // threshold and signed by the new set's own.
    let next = nimbus::trust::advance(current, &bytes, &sigs).map_err(|e| {
        ImageError::Invalid(match e {
            TrustError::NotVouched { .. } => format!(
                "{e}; sign with --key for {} of the current keys ({})",
                current.threshold,
                current.summary()
            ),
            TrustError::NotSelfSigned { .. } => {
                format!("{e}; sign with --key for the new keys as well")
            }
            e => e.to_string(),
        })
    })?;
    let path = o.repo.join(nimbus::trust::repo_path(doc.version));
    if path.exists() {
        return Err(ImageError::Invalid(format!(
            "{} exists; a published trust set is immutable",
            path.display()
        )));
    }
    // The set, then its signatures, each whole (the chain store's rule: a
    // reader that finds the set without them stops its walk there and
    // comes back on its next check).
    let link = nimbus::trust::Link {
        version: doc.version,
        bytes,
        sigs,
    };
    nimbus::chain::write(
        &nimbus::chain::PublishDir(o.repo.to_path_buf()),
        nimbus::repo::TRUST_DIR,
        &[link],
    )
    .map_err(|e| ImageError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(next)
}

/// Publish and return the new manifest.
pub fn publish(o: &PublishOptions<'_>) -> Result<Manifest, ImageError> {
    if !nimbus::release::valid_channel_name(o.channel) {
        return Err(ImageError::Invalid(format!(
            "channel name {:?} is not [a-z0-9._-]{{1,64}}",
            o.channel
        )));
    }
    let bj_path = o.from.join("build.json");
    let bj: BuildJson = serde_json::from_slice(&std::fs::read(&bj_path).map_err(io_at(&bj_path))?)
        .map_err(|e| ImageError::Invalid(format!("{}: {e}", bj_path.display())))?;
    let payload = o.from.join("usr.img.zst");
    let size = std::fs::metadata(&payload).map_err(io_at(&payload))?.len();
    let sha = crate::sha256_file(&payload)?;
    if size != bj.payload.compressed_size || sha != bj.payload.compressed_sha256 {
        return Err(ImageError::Invalid(format!(
            "{}: {size} bytes, sha256 {sha}, but build.json says {} bytes, sha256 {}; \
             the payload changed after the build, rebuild it",
            payload.display(),
            bj.payload.compressed_size,
            bj.payload.compressed_sha256
        )));
    }
    let mut trust = current_trust(o.repo, o.from)?;
    if let Some(r) = &o.rotation {
        trust = rotate(o, &trust, r)?;
    }
    let mpath = manifest_path(o.repo, o.channel);
    let previous: Option<Manifest> = match std::fs::read(&mpath) {
        Ok(b) => Some(
            serde_json::from_slice(&b)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", mpath.display())))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(ImageError::Io {
                path: mpath,
                source: e,
            })
        }
    };
    let release = Release {
        version: bj.version.clone(),
        payload: payload_rel(&bj.version),
        compressed_size: size,
        compressed_sha256: sha.clone(),
        raw_size: bj.payload.raw_size,
        raw_sha256: bj.payload.raw_sha256.clone(),
        verity_root: bj.verity_root.clone(),
        rollout: o.rollout_secs.map(|d| Rollout {
            start: o.now,
            duration_secs: d,
            paused: false,
        }),
        stage1: stage1_of(o.from, &bj.version)?.map(Box::new),
        delta: Some(Box::new(delta_of(o.from, &bj)?)),
    };
    let mut releases: Vec<Release> = previous
        .as_ref()
        .map(|m| m.releases.clone())
        .unwrap_or_default();
    if let Some(old) = releases.iter().find(|r| r.version == release.version) {
        let delta_differs = old.delta.is_some() && old.delta != release.delta;
        if old.compressed_sha256 != release.compressed_sha256
            || old.stage1 != release.stage1
            || delta_differs
        {
            return Err(ImageError::Invalid(format!(
                "channel {} already offers {} with payload sha256 {}; a published version is immutable, \
                 build a new version instead",
                o.channel, release.version, old.compressed_sha256
            )));
        }
    }
    releases.retain(|r| r.version != release.version);
    releases.push(release);
    releases.sort_by(|a, b| a.version.cmp(&b.version));

    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        channel: o.channel.to_string(),
        serial: previous.as_ref().map_or(1, |m| m.serial + 1),
        issued: o.now,
        expires: o.now
            + chrono::Duration::seconds(
                o.expires_secs
                    .min(nimbus::release::MAX_MANIFEST_LIFETIME_SECS as u64 + 1)
                    as i64,
            ),
        max_version: match (&o.max_version, o.clear_max_version) {
            (Some(v), _) => Some(v.clone()),
            (None, true) => None,
            (None, false) => previous.as_ref().and_then(|m| m.max_version.clone()),
        },
        releases,
    };
    manifest
        .validate()
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    // Payload (and stage 1) first: a manifest must never name a file that
    // is not there.
    place_immutable(&payload, o.repo, &payload_rel(&bj.version), &sha)?;
    if let Some(d) = manifest
        .releases
        .iter()
        .find(|r| r.version == bj.version)
        .and_then(|r| r.delta.as_ref())
    {
        for (name, f) in [(PACK_FILE, &d.pack), (INDEX_FILE, &d.index)] {
            place_immutable(&o.from.join(name), o.repo, &f.path, &f.sha256)?;
        }
    }
    if let Some(s1) = manifest
        .releases
        .iter()
        .find(|r| r.version == bj.version)
        .and_then(|r| r.stage1.as_ref())
    {
        for (name, f) in [
            (nimbus::esp::KERNEL, &s1.kernel),
            (nimbus::esp::INITRAMFS, &s1.initramfs),
        ] {
            place_immutable(
                &o.from.join("stage1").join(name),
                o.repo,
                &f.path,
                &f.sha256,
            )?;
        }
    }

    let mut bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::Invalid(e.to_string()))?;
    bytes.push(b'\n');
    let sig_bytes = sign_json(&bytes, o.keys)?;
    // Refuse to publish what no host would accept.
    nimbus::release::verify_detached(&bytes, &sig_bytes, &trust).map_err(|e| {
        ImageError::Invalid(format!(
            "the manifest's signatures do not satisfy the repository's trust set ({}): {e}",
            trust.summary()
        ))
    })?;
    let chan_dir = o.repo.join("channels");
    std::fs::create_dir_all(&chan_dir).map_err(io_at(&chan_dir))?;
    let durable = |p: &Path, b: &[u8]| {
        nimbus::durable::write_atomic(p, b, 0o644).map_err(|e| ImageError::Invalid(e.to_string()))
    };
    durable(&nimbus::repo::sig_path(&mpath), &sig_bytes)?;
    durable(&mpath, &bytes)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus::trust::TrustDoc;

    /// A build directory with a small real payload (a sealed 32 KiB data
    /// area): publish reads build.json and makes the delta files from it.
    fn fake_build(dir: &Path, version: &str, key: &ReleaseKey) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("trust.json"),
            TrustDoc::initial([key.public()], 1).to_bytes(),
        )
        .unwrap();
        let fs = dir.join("usr.fs");
        std::fs::write(&fs, format!("data of {version}").repeat(2000)).unwrap();
        let v: Version = version.parse().unwrap();
        let slot = crate::usr::seal(&fs, &v, 0, 1 << 20, &[key]).unwrap();
        let info = slot.write_payload(&dir.join("usr.img.zst"), 3).unwrap();
        let bj = serde_json::json!({
            "version": version,
            "verity_root": hex::encode(slot.fields.verity_root),
            "payload": info,
        });
        std::fs::write(dir.join("build.json"), bj.to_string()).unwrap();
    }

    #[test]
    fn the_kill_switch_stays_until_cleared() {
        let d = tempfile::tempdir().unwrap();
        let key = nimbus::keys::ReleaseKey::generate().unwrap();
        let repo = d.path().join("repo");
        let pubv = |v: &str, max: Option<&str>, clear: bool| {
            let from = d.path().join(v);
            fake_build(&from, v, &key);
            publish(&PublishOptions {
                from: &from,
                repo: &repo,
                channel: "stable",
                keys: &[&key],
                rotation: None,
                now: chrono::Utc::now(),
                expires_secs: 3600,
                rollout_secs: None,
                max_version: max.map(|m| m.parse().unwrap()),
                clear_max_version: clear,
            })
            .unwrap()
        };
        let v = |s: &str| Some(s.parse::<Version>().unwrap());
        assert_eq!(pubv("1.0.0", Some("1.0.0"), false).max_version, v("1.0.0"));
        // The next publish does not repeat it: still in force.
        assert_eq!(pubv("1.1.0", None, false).max_version, v("1.0.0"));
        assert_eq!(pubv("1.2.0", Some("1.2.0"), false).max_version, v("1.2.0"));
        assert_eq!(pubv("1.3.0", None, true).max_version, None);
        assert_eq!(pubv("1.4.0", None, false).max_version, None);
    }

    #[test]
    fn rotation_is_checked_like_a_host_checks_it() {
        let d = tempfile::tempdir().unwrap();
        let (k1, k2) = (
            ReleaseKey::from_secret([1; 32]),
            ReleaseKey::from_secret([2; 32]),
        );
        let repo = d.path().join("repo");
        let pubv = |v: &str, keys: &[&ReleaseKey], rotation: Option<Rotation>| {
            let from = d.path().join(v);
            fake_build(&from, v, &k1);
            publish(&PublishOptions {
                from: &from,
                repo: &repo,
                channel: "stable",
                keys,
                rotation,
                now: chrono::Utc::now(),
                expires_secs: 3600,
                rollout_secs: None,
                max_version: None,
                clear_max_version: false,
            })
        };
        let add2 = Rotation {
            add: vec![k2.public()],
            ..Rotation::default()
        };
        // The new key must sign its own set.
        let e = pubv("1.0.0", &[&k1], Some(add2.clone())).unwrap_err();
        assert!(e.to_string().contains("did not sign"), "{e}");
        assert!(!repo.join("trust/2.json").exists());
        pubv("1.0.0", &[&k1, &k2], Some(add2)).unwrap();
        assert!(repo.join("trust/2.json.sig").exists());
        // Signed by key 2 alone: trusted since version 2.
        pubv("1.1.0", &[&k2], None).unwrap();
        let remove1 = Rotation {
            remove: vec![k1.id],
            ..Rotation::default()
        };
        pubv("1.2.0", &[&k2], Some(remove1)).unwrap();
        let t = current_trust(&repo, &d.path().join("1.0.0")).unwrap();
        assert_eq!(t.version, 3);
        assert!(!t.keys.contains_key(&k1.id));
        // Key 1 was removed: nothing it signs is published.
        let e = pubv("1.3.0", &[&k1], None).unwrap_err();
        assert!(e.to_string().contains("not trusted"), "{e}");
        let e = pubv(
            "1.3.0",
            &[&k1],
            Some(Rotation {
                add: vec![k1.public()],
                ..Rotation::default()
            }),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not vouched for"), "{e}");
    }
}
