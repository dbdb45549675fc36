//! The engine's decisions with a fake transport and a fixed clock: the
//! repository is written by the real publisher into a directory, and the
//! fake serves its files (and can refuse ranges); the disk is a real image
//! file.

use std::io::Cursor;
use std::sync::Mutex;

use std::path::{Path, PathBuf};

use chrono::Utc;
use nimbus::release::ManifestError;

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
    /// Signs the releases and trust set 1.
    key: ReleaseKey,
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
    crate::state::Store::new(&root)
        .save(&crate::state::Persisted {
            channel: crate::state::ChannelState {
                rollout_seed: Some(seed),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
    World {
        _tmp: tmp,
        key,
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
    let rep = e.shared().snapshot().last_apply.unwrap();
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
    let rep = e.shared().snapshot().last_apply.unwrap();
    assert_eq!(rep.mode, "full");
    assert!(rep
        .delta_fallback
        .unwrap_or_default()
        .contains("ignored the Range request"));
}

// ---- Each owner alone, through the same fakes -----------------------------

/// The handles an owner borrows, for the world's host at `now`.
fn ctx(w: &World, now: chrono::DateTime<Utc>) -> (Ctx, TrustKeeper, Ledger) {
    let host = Host::image(&w.root, &w.disk).unwrap();
    let mut trust = TrustKeeper::load(&host).unwrap();
    let running = trust.settle_booted(&host).unwrap();
    let ledger = Ledger::open(&w.root).unwrap();
    let ctx = Ctx {
        cfg: EngineConfig::load(&w.root).unwrap(),
        http: Box::new(FakeServer {
            root: w.repo.clone(),
            base: BASE.into(),
            ignore_range: false,
            log: w.log.clone(),
        }),
        clock: Box::new(FixedClock(now)),
        shared: std::sync::Arc::new(Shared::new()),
        running,
        host,
    };
    (ctx, trust, ledger)
}

#[test]
fn the_installer_alone_writes_the_passive_slot_and_flips_after_its_hook() {
    let t0 = Utc::now();
    let w = world(t0, None, 0.5);
    let (ctx, mut trust, mut ledger) = ctx(&w, t0);
    // Another owner's record: the installer leaves it alone.
    ledger
        .edit(|s: &mut crate::state::Reports| {
            s.state_reset = Some(crate::state::StateReset {
                kept_as: "x".into(),
                reason: "test".into(),
                at: t0,
            })
        })
        .unwrap();
    let m = channel::fetch_manifest(&ctx, &mut trust, &mut ledger, "stable").unwrap();
    let Choice::Offer(r) = channel::choose(&ctx, &ledger, &m) else {
        panic!("1.1.0 not offered")
    };
    let mut seen_at_flip = None;
    let rep = Installer {
        ctx: &ctx,
        trust: trust.view(),
        ledger: &mut ledger,
    }
    .install(&r, &format!("{BASE}/{}", r.payload), None, &mut |_| {
        // Written and verified, not bootable yet.
        seen_at_flip = Some(ctx.slots(trust.view()).unwrap().staged());
        Ok(())
    })
    .unwrap();
    assert_eq!(rep.mode, "delta");
    assert_eq!(
        seen_at_flip,
        Some(None),
        "the slot was bootable before the hook ran"
    );
    let view = ctx.slots(trust.view()).unwrap();
    assert_eq!(view.staged(), Some("1.1.0".parse().unwrap()));
    let p = Ledger::open(&w.root).unwrap().get().clone();
    assert_eq!(p.install, crate::state::InstallState::default());
    assert!(p.reports.state_reset.is_some());
}

#[test]
fn the_installer_alone_refuses_a_slot_that_does_not_verify_and_leaves_it_unbootable() {
    let t0 = Utc::now();
    let w = world(t0, None, 0.5);
    let (ctx, mut trust, mut ledger) = ctx(&w, t0);
    let m = channel::fetch_manifest(&ctx, &mut trust, &mut ledger, "stable").unwrap();
    let Choice::Offer(mut r) = channel::choose(&ctx, &ledger, &m) else {
        panic!("1.1.0 not offered")
    };
    // The manifest's root disagrees with the slot's descriptor.
    r.verity_root = "00".repeat(32);
    let mut hook_ran = false;
    let e = Installer {
        ctx: &ctx,
        trust: trust.view(),
        ledger: &mut ledger,
    }
    .install(&r, &format!("{BASE}/{}", r.payload), None, &mut |_| {
        hook_ran = true;
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("verity root"), "{e}");
    assert!(!hook_ran);
    assert_eq!(ctx.slots(trust.view()).unwrap().staged(), None);
}

fn view(staged: bool, booted_good: bool) -> SlotView {
    use nimbus::slots::Prio;
    let e = |number, priority, tries, successful, v: &str| slot_view::ViewEntry {
        number,
        prio: Prio {
            priority,
            tries,
            successful,
        },
        version: Some(v.parse().unwrap()),
    };
    SlotView {
        booted: 3,
        entries: vec![
            e(3, 1, 0, booted_good, "1.0.0"),
            if staged {
                e(4, 2, 1, false, "1.1.0")
            } else {
                e(4, 0, 0, false, "1.1.0")
            },
        ],
    }
}

fn set_strategy(w: &World, s: &str) {
    std::fs::write(
        w.root.join(nimbus::paths::UPDATE_CONF_ETC),
        format!("GROUP=stable\nSERVER={BASE}\nREBOOT_STRATEGY={s}\n"),
    )
    .unwrap();
}

#[test]
fn the_coordinator_alone_undoes_a_failed_pre_reboot_hook_and_waits() {
    use crate::policy::Decision;
    let t0 = Utc::now();
    let w = world(t0, None, 0.5);
    set_strategy(&w, "reboot");
    let hooks = w.root.join(nimbus::paths::HOOKS_ETC);
    for (kind, script) in [
        (
            "pre-reboot.d",
            "#!/bin/sh\necho drain refused >&2\nexit 3\n",
        ),
        (
            "post-good.d",
            "#!/bin/sh\necho undone >> \"$NIMBUS_ROOT/undone\"\n",
        ),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let d = hooks.join(kind);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("10-x"), script).unwrap();
        std::fs::set_permissions(d.join("10-x"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (ctx, _trust, mut ledger) = ctx(&w, t0);
    let mut c = Coordinator::default();
    let d = c.step(&ctx, &mut ledger, &view(true, true)).unwrap();
    let Decision::Wait { why, .. } = d else {
        panic!("rebooted through a failed hook: {d:?}")
    };
    assert!(why.contains("pre-reboot hook 10-x failed"), "{why}");
    assert!(why.contains("post-good hooks ran to undo it"), "{why}");
    assert_eq!(
        std::fs::read_to_string(w.root.join("undone")).unwrap(),
        "undone\n"
    );
    assert_eq!(ledger.get().reboot, crate::state::RebootState::default());
    // And not again before the retry time.
    let d = c.step(&ctx, &mut ledger, &view(true, true)).unwrap();
    assert!(
        matches!(&d, Decision::Wait { why, .. } if why.contains("tried again in")),
        "{d:?}"
    );
}

#[test]
fn the_coordinator_alone_records_the_reboot_then_reactivates_once_good() {
    use crate::policy::Decision;
    let t0 = Utc::now();
    let w = world(t0, None, 0.5);
    set_strategy(&w, "reboot");
    let (mut ctx, _trust, mut ledger) = ctx(&w, t0);
    let mut c = Coordinator::default();
    assert_eq!(
        c.step(&ctx, &mut ledger, &view(false, true)).unwrap(),
        Decision::Nothing
    );
    assert_eq!(
        c.step(&ctx, &mut ledger, &view(true, true)).unwrap(),
        Decision::Reboot
    );
    // Saved before the reboot: the post-good hooks are owed.
    let on_disk = Ledger::open(&w.root).unwrap();
    assert_eq!(
        on_disk.get().reboot.post_good_pending.as_deref(),
        Some("1.1.0")
    );
    // The next boot, good: they run, the debt is paid.
    ctx.running = "1.1.0".parse().unwrap();
    assert_eq!(
        c.step(&ctx, &mut ledger, &view(false, true)).unwrap(),
        Decision::Nothing
    );
    assert_eq!(ledger.get().reboot.post_good_pending, None);
    // REBOOT_STRATEGY=off: never reboots, says so on the host.
    set_strategy(&w, "off");
    ctx.cfg = EngineConfig::load(&w.root).unwrap();
    let flag = w.root.join(nimbus::paths::REBOOT_REQUIRED);
    std::fs::create_dir_all(flag.parent().unwrap()).unwrap();
    let d = c.step(&ctx, &mut ledger, &view(true, true)).unwrap();
    assert!(matches!(d, Decision::Wait { .. }), "{d:?}");
    assert!(flag.is_file());
}

/// Trust set `v` of `keys`, published with signatures by `by`.
fn publish_trust(w: &World, v: u64, keys: &[&ReleaseKey], by: &[&ReleaseKey]) {
    let mut doc = nimbus::trust::TrustDoc::initial(keys.iter().map(|k| k.public()), 1);
    doc.version = v;
    let bytes = doc.to_bytes();
    let path = w.repo.join(nimbus::trust::repo_path(v));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let sigs = nimbus::release::Manifest::sign_bytes(&bytes, by);
    std::fs::write(
        nimbus::repo::sig_path(&path),
        serde_json::to_vec(&sigs).unwrap(),
    )
    .unwrap();
}

#[test]
fn the_trust_keeper_alone_learns_a_rotation_and_refuses_a_forged_one() {
    let t0 = Utc::now();
    let w = world(t0, None, 0.5);
    let (ctx, mut trust, _ledger) = ctx(&w, t0);
    let k2 = ReleaseKey::generate().unwrap();
    let forger = ReleaseKey::generate().unwrap();
    // Set 2 vouched for by set 1 and by itself; set 3 by a stranger.
    publish_trust(&w, 2, &[&k2], &[&w.key, &k2]);
    publish_trust(&w, 3, &[&forger], &[&forger]);
    let e = trust.learn(&ctx, BASE).unwrap_err();
    assert!(matches!(e, UpdateError::Trust { .. }), "{e}");
    assert!(e.to_string().contains("trust/3.json"), "{e}");
    assert_eq!(trust.view().newest().version, 2);
    let chain = w.root.join(nimbus::paths::TRUST_CHAIN_ROOT);
    assert!(chain.join("2.json").is_file() && chain.join("2.json.sig").is_file());
    assert!(!chain.join("3.json").exists());
    // Stage 1 keeps set 1 until the booted slot verifies under 2.
    assert_eq!(trust.view().active().version, 1);
    // Shown in the status.
    let st = ctx.shared.snapshot().trust.unwrap();
    assert_eq!((st.usr.version, st.active_version), (2, 1));
}
