//! The engine's decisions with a fake transport and a fixed clock: the
//! repository is written by the real publisher into a directory, and the
//! fake serves its files (and can refuse ranges); the disk is a real image
//! file.

use std::io::Cursor;
use std::sync::Mutex;

use super::*;
use crate::fetch::Body;
use nimbus::keys::ReleaseKey;
use nimbus::layout::MIB;

struct FakeServer {
    root: PathBuf,
    base: String,
    ignore_range: bool,
    log: std::sync::Arc<Mutex<Vec<String>>>,
}

impl FakeServer {
    fn file(&self, url: &str) -> Option<Vec<u8>> {
        self.log.lock().unwrap().push(url.to_string());
        let rel = url.strip_prefix(&self.base)?.trim_start_matches('/');
        std::fs::read(self.root.join(rel)).ok()
    }
    fn body(url: &str, data: Vec<u8>, start: u64) -> Body {
        Body::from_reader(url, Box::new(Cursor::new(data)), start)
    }
}

impl Transport for FakeServer {
    fn get_small_opt(&self, url: &str, _limit: usize) -> Result<Option<Vec<u8>>, UpdateError> {
        Ok(self.file(url))
    }
    fn get_from(&self, url: &str, offset: u64) -> Result<Body, UpdateError> {
        let d = self
            .file(url)
            .ok_or_else(|| UpdateError::PayloadMissing { url: url.into() })?;
        Ok(FakeServer::body(url, d[offset as usize..].to_vec(), offset))
    }
    fn get_range(&self, url: &str, start: u64, end: u64) -> Result<Body, UpdateError> {
        if self.ignore_range {
            return Err(UpdateError::RangeIgnored { url: url.into() });
        }
        let d = self
            .file(url)
            .ok_or_else(|| UpdateError::PayloadMissing { url: url.into() })?;
        Ok(FakeServer::body(
            url,
            d[start as usize..end as usize].to_vec(),
            start,
        ))
    }
}

struct FixedClock(chrono::DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> chrono::DateTime<Utc> {
        self.0
    }
}

struct World {
    _tmp: tempfile::TempDir,
    disk: PathBuf,
    root: PathBuf,
    repo: PathBuf,
    log: std::sync::Arc<Mutex<Vec<String>>>,
}

const BASE: &str = "http://repo.test";
const USR: u64 = 8 * MIB;

/// A sealed slot of `blocks` 4 KiB blocks; `change` rewrites one block.
fn version_dir(
    w: &Path,
    v: &str,
    key: &ReleaseKey,
    change: Option<usize>,
) -> nimbus_image::usr::UsrSlot {
    let dir = w.join(v);
    std::fs::create_dir_all(&dir).unwrap();
    // Incompressible and every block different, like binaries.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut data: Vec<u8> = (0..400 * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if let Some(b) = change {
        data[b * 4096..(b + 1) * 4096].fill(0x5a);
    }
    std::fs::write(dir.join("fs"), &data).unwrap();
    let ver: Version = v.parse().unwrap();
    let slot = nimbus_image::usr::seal(&dir.join("fs"), &ver, 0, USR, &[key]).unwrap();
    let info = slot.write_payload(&dir.join("usr.img.zst"), 3).unwrap();
    let bj = serde_json::json!({"version": v, "verity_root": hex::encode(slot.fields.verity_root), "payload": info});
    std::fs::write(dir.join("build.json"), bj.to_string()).unwrap();
    std::fs::write(
        dir.join("trust.json"),
        nimbus::trust::TrustDoc::initial([key.public()], 1).to_bytes(),
    )
    .unwrap();
    slot
}

/// A host on 1.0.0; 1.1.0 (one block changed) published on `stable`
/// with a rollout of `rollout_secs`, issued at `now`.
fn world(now: chrono::DateTime<Utc>, rollout_secs: Option<u64>, seed: f64) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path();
    let key = ReleaseKey::generate().unwrap();
    let a = version_dir(w, "1.0.0", &key, None);
    version_dir(w, "1.1.0", &key, Some(7));
    let disk = w.join("disk.raw");
    nimbus_testkit::host::disk(
        &disk,
        USR,
        1,
        nimbus_testkit::host::SlotInit::good(1, Some(&a)),
        nimbus_testkit::host::SlotInit::EMPTY,
    )
    .unwrap();
    let repo = w.join("repo");
    let keys = [&key];
    nimbus_image::release::publish(&nimbus_image::release::PublishOptions {
        now,
        rollout_secs,
        ..nimbus_image::release::PublishOptions::simple(&w.join("1.1.0"), &repo, "stable", &keys)
    })
    .unwrap();
    let root = nimbus_testkit::host::root(
        &w.join("root"),
        &std::fs::read(w.join("1.0.0/trust.json")).unwrap(),
        &format!("GROUP=stable\nSERVER={BASE}\nIO_WRITE_BPS=unlimited\n"),
    )
    .unwrap();
    let store = Store::new(&root);
    store
        .save(&Persisted {
            rollout_seed: Some(seed),
            ..Persisted::default()
        })
        .unwrap();
    World {
        _tmp: tmp,
        disk,
        root,
        repo,
        log: Default::default(),
    }
}

fn engine(w: &World, now: chrono::DateTime<Utc>, ignore_range: bool) -> Engine {
    let host = Host::image(&w.root, &w.disk).unwrap();
    let http = FakeServer {
        root: w.repo.clone(),
        base: BASE.into(),
        ignore_range,
        log: w.log.clone(),
    };
    Engine::with_transport(
        host,
        Box::new(http),
        Box::new(FixedClock(now)),
        std::sync::Arc::new(Shared::new()),
    )
    .unwrap()
}

#[test]
fn the_engines_clock_decides_expiry() {
    let t0 = Utc::now();
    let w = world(t0, None, 0.5);
    let mut e = engine(&w, t0 + chrono::Duration::days(2), false);
    match e.check() {
        Err(UpdateError::Manifest {
            source: ManifestError::Expired { .. },
            ..
        }) => {}
        other => panic!(
            "expected an expired manifest, got {:?}",
            other.map(|r| r.choice)
        ),
    }
    let mut e = engine(&w, t0, false);
    assert!(matches!(e.check().unwrap().choice, Choice::Offer(_)));
}

#[test]
fn a_rollout_waits_for_this_hosts_turn() {
    let t0 = Utc::now();
    // A 10-hour rollout; this host's place is at 60 %.
    let w = world(t0, Some(10 * 3600), 0.6);
    let mut e = engine(&w, t0 + chrono::Duration::hours(5), false);
    let c = e.check().unwrap().choice;
    assert!(!matches!(c, Choice::Offer(_)), "offered before its turn");
    let mut e = engine(&w, t0 + chrono::Duration::hours(7), false);
    assert!(matches!(e.check().unwrap().choice, Choice::Offer(_)));
}

#[test]
fn a_one_block_change_goes_by_delta_and_falls_back_when_ranges_are_refused() {
    let t0 = Utc::now();
    let w = world(t0, None, 0.5);
    let mut e = engine(&w, t0, false);
    assert_eq!(e.update().unwrap(), Some("1.1.0".parse().unwrap()));
    let rep = e.shared.snapshot().last_apply.unwrap();
    assert_eq!(rep.mode, "delta");
    let d = rep.delta.unwrap();
    assert_eq!(
        (d.fetched_frames, d.from_booted),
        (1, d.blocks - 1),
        "{d:?}"
    );
    let log = w.log.lock().unwrap().clone();
    assert!(!log.iter().any(|u| u.ends_with("usr.img.zst")), "{log:?}");

    // Again from 1.0.0, with a transport that refuses ranges.
    let w = world(t0, None, 0.5);
    let mut e = engine(&w, t0, true);
    assert_eq!(e.update().unwrap(), Some("1.1.0".parse().unwrap()));
    let rep = e.shared.snapshot().last_apply.unwrap();
    assert_eq!(rep.mode, "full");
    assert!(rep
        .delta_fallback
        .unwrap_or_default()
        .contains("ignored the Range request"));
}
