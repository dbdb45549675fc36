//! The update engine: check a channel, choose, apply into the passive slot,
//! flip. The effects it needs (HTTP, the disk, the state file, cgroups) are
//! narrow modules; the decisions are in `choose` and `nimbus::slots`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use chrono::Utc;
use nimbus::gpt::{Disk, GptError};
use nimbus::keys::TrustStore;
use nimbus::layout::Slot;
use nimbus::release::{
    Manifest, ManifestError, ManifestPolicy, Release, SlotDescriptor, MAX_MANIFEST_BYTES,
    MAX_SIGNATURES_BYTES,
};
use nimbus::slots;
use nimbus::trust::Link;
use semver::Version;

use crate::apply;
use crate::choose::{self, Choice};
use crate::config::EngineConfig;
use crate::error::{io_at, UpdateError};
use crate::fetch::{Http, Transport};
use crate::state::{Persisted, Store};
use crate::status::{ErrorReport, SlotInfo, State, Status};
use crate::target::SlotDevice;

mod install;
mod reboot;
mod slot_view;
mod stage1;

pub use slot_view::SlotView;

use stage1::load_trust;

/// How the engine reaches the disk: the GPT and the slot's bytes. Files and
/// block devices in production; the power-cut harness records and cuts.
pub trait Storage: Send + Sync {
    fn gpt(&self, writable: bool) -> Result<Disk<Box<dyn nimbus::gpt::BlockDevice>>, GptError>;
    fn slot(&self, partition: u32, offset: u64, size: u64) -> Result<SlotDevice, UpdateError>;
}

/// A disk image file or a block device.
pub struct FileStorage(pub PathBuf);

impl Storage for FileStorage {
    fn gpt(&self, writable: bool) -> Result<Disk<Box<dyn nimbus::gpt::BlockDevice>>, GptError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&self.0)
            .map_err(|source| GptError::Io {
                path: self.0.clone(),
                source,
            })?;
        if writable {
            nimbus::gpt::lock_exclusive(&f, &self.0, nimbus::gpt::LOCK_WAIT)?;
        }
        Disk::open(Box::new(f) as Box<dyn nimbus::gpt::BlockDevice>, &self.0)
    }
    fn slot(&self, partition: u32, offset: u64, size: u64) -> Result<SlotDevice, UpdateError> {
        SlotDevice::open(&self.0, partition, offset, size)
    }
}

/// Where the engine runs: a real host (booted slot from the kernel command
/// line) or host mode (an image file; the slot the boot rule would pick).
#[derive(Clone)]
pub struct Host {
    pub root: PathBuf,
    pub disk: PathBuf,
    pub booted: u32,
    pub host_mode: bool,
    pub storage: std::sync::Arc<dyn Storage>,
    /// The boot disk's ESP: stage 1's copies and the trust rotations.
    pub esp: std::sync::Arc<dyn nimbus::esp::Esp>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("root", &self.root)
            .field("disk", &self.disk)
            .field("booted", &self.booted)
            .field("host_mode", &self.host_mode)
            .finish()
    }
}

impl Host {
    pub fn image(root: &Path, disk: &Path) -> Result<Host, UpdateError> {
        let d = Disk::open_path(disk, false)?;
        d.check_nimbus_layout()?;
        let mut table = d.slot_table();
        let choice = slots::select_for_boot(&mut table, &[]).ok_or_else(|| {
            UpdateError::NoBootedSlot(format!("{}: no USR slot is bootable", disk.display()))
        })?;
        let esp = d.partition(nimbus::layout::ESP_PARTITION)?;
        Ok(Host {
            root: root.to_path_buf(),
            disk: disk.to_path_buf(),
            booted: choice.number,
            host_mode: true,
            storage: std::sync::Arc::new(FileStorage(disk.to_path_buf())),
            esp: std::sync::Arc::new(crate::esp::ImageEsp {
                image: disk.to_path_buf(),
                offset: esp.offset_bytes(),
            }),
        })
    }

    /// The running system: `nimbus.usr=PARTUUID=` names the booted slot;
    /// the disk is whichever one holds a partition with that GUID. Never
    /// inferred from priorities, which say what boots next, not what runs.
    pub fn running(root: &Path) -> Result<Host, UpdateError> {
        let cmdline =
            nimbus::boot::booted_cmdline(root).map_err(io_at(Path::new("/proc/cmdline")))?;
        let args = nimbus::boot::parse_cmdline(&cmdline).ok_or_else(|| {
            UpdateError::NoBootedSlot("no nimbus.usr=PARTUUID= on the kernel command line".into())
        })?;
        // Several disks can hold this PARTUUID (a pristine copy of the
        // image attached for rescue): stage 1's `nimbus.disk=` names ours,
        // and any other disk is never touched.
        let disks = nimbus::boot::scan_disks();
        let d =
            nimbus::boot::pick_running_disk(&disks, &args).map_err(UpdateError::NoBootedSlot)?;
        let dev = PathBuf::from("/dev").join(&d.name);
        let disk =
            Disk::open_path(&dev, false).map_err(|e| UpdateError::NoBootedSlot(e.to_string()))?;
        let p = disk
            .partitions()
            .into_iter()
            .find(|p| p.uuid == args.partuuid)
            .ok_or_else(|| {
                UpdateError::NoBootedSlot(format!(
                    "{}: no partition with PARTUUID {}",
                    dev.display(),
                    args.partuuid
                ))
            })?;
        let (_, esp_dev) = nimbus::boot::partition_device(&d.name, nimbus::layout::ESP_PARTITION)
            .map_err(UpdateError::NoBootedSlot)?;
        Ok(Host {
            root: root.to_path_buf(),
            storage: std::sync::Arc::new(FileStorage(dev.clone())),
            disk: dev,
            booted: p.number,
            host_mode: false,
            esp: std::sync::Arc::new(crate::esp::MountedEsp {
                dev: esp_dev,
                mnt: root.join(nimbus::paths::ENGINE_MOUNTS).join("esp"),
            }),
        })
    }
}

/// What API threads share with the engine.
pub struct Shared {
    pub status: Mutex<Status>,
    pub changed: Condvar,
    pub seq: AtomicU64,
    pub cancel: AtomicBool,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            status: Mutex::new(Status::new()),
            changed: Condvar::new(),
            seq: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
        }
    }

    pub fn snapshot(&self) -> Status {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        f(&mut s);
        self.seq.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Options {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Total time allowed for a manifest or signature fetch.
    pub fetch_deadline: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            fetch_deadline: Duration::from_secs(60),
        }
    }
}

/// The trust sets this host knows (docs/security.md, "Rotating keys").
#[derive(Debug, Clone)]
pub struct TrustView {
    /// USR's built-in set, then each rotation learned from the release
    /// repository, each checked against the one before.
    pub sets: Vec<TrustStore>,
    /// The learned rotations as stored on ROOT, for the copy on the ESP.
    links: Vec<Link>,
    /// Index in `sets` of the newest set that still verifies the booted
    /// slot: the newest stage 1 may be given without making the running
    /// version unbootable.
    pub active: usize,
    /// Why a stored rotation was not taken, if one was not.
    pub chain_error: Option<String>,
    /// The newest version known to be on the ESP (read once, then kept).
    pub esp_version: Option<u64>,
}

impl TrustView {
    /// Manifests, new slots and trust rotations are checked against this.
    pub fn newest(&self) -> &TrustStore {
        // Invariant: `sets` always holds the built-in set.
        &self.sets[self.sets.len() - 1]
    }

    pub fn active(&self) -> &TrustStore {
        &self.sets[self.active.min(self.sets.len() - 1)]
    }
}

pub struct Engine {
    pub host: Host,
    pub cfg: EngineConfig,
    store: Store,
    persisted: Persisted,
    trust: TrustView,
    http: Box<dyn Transport>,
    clock: Box<dyn Clock>,
    pub shared: std::sync::Arc<Shared>,
    running: Version,
    /// No reboot before this: a pre-reboot hook failed.
    hooks_retry_at: Option<std::time::Instant>,
}

/// The engine's idea of now: manifest expiry, rollouts, reports.
pub trait Clock: Send + Sync {
    fn now(&self) -> chrono::DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> chrono::DateTime<Utc> {
        Utc::now()
    }
}

pub struct CheckResult {
    pub manifest: Manifest,
    pub choice: Choice,
}

fn manifest_err(url: &str, source: ManifestError) -> UpdateError {
    UpdateError::Manifest {
        url: url.to_string(),
        source,
    }
}

impl Engine {
    pub fn new(
        host: Host,
        opts: &Options,
        shared: std::sync::Arc<Shared>,
    ) -> Result<Engine, UpdateError> {
        let http = Http::new(opts.connect_timeout, opts.read_timeout, opts.fetch_deadline)?;
        Engine::with_transport(host, Box::new(http), Box::new(SystemClock), shared)
    }

    /// An engine over any transport and clock (the unit tests' own).
    pub fn with_transport(
        host: Host,
        http: Box<dyn Transport>,
        clock: Box<dyn Clock>,
        shared: std::sync::Arc<Shared>,
    ) -> Result<Engine, UpdateError> {
        let cfg = EngineConfig::load(&host.root)?;
        let trust = load_trust(&host)?;
        let store = Store::new(&host.root);
        let mut persisted = store.load()?;
        if persisted.rollout_seed.is_none() {
            let mut b = [0u8; 8];
            getrandom::getrandom(&mut b).map_err(|e| {
                UpdateError::Refused(format!("no randomness for the rollout seed: {e}"))
            })?;
            persisted.rollout_seed =
                Some((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64);
            store.save(&persisted)?;
        }
        let mut e = Engine {
            host,
            cfg,
            store,
            persisted,
            trust,
            http,
            clock,
            shared,
            running: Version::new(0, 0, 0),
            hooks_retry_at: None,
        };
        // The booted slot was checked by stage 1; what it verifies under
        // is the newest set that stage 1 may be given.
        let booted = Slot::from_partition_number(e.host.booted).ok_or_else(|| {
            UpdateError::NoBootedSlot(format!("partition {} is not a USR slot", e.host.booted))
        })?;
        let desc = e.host.storage.gpt(false)?.read_descriptor(booted)?;
        let verified = e.trust.sets.iter().enumerate().rev().find_map(|(i, t)| {
            SlotDescriptor::verify(&desc, t)
                .ok()
                .map(|d| (i, d.version))
        });
        let (active, version) = verified.ok_or_else(|| {
            UpdateError::NoBootedSlot(format!(
                "the booted slot (partition {}) has no descriptor valid under any known trust set",
                e.host.booted
            ))
        })?;
        e.trust.active = active;
        e.running = version;
        e.publish_trust();
        if let Err(err) = e.detect_rollback() {
            tracing::warn!("checking for a rollback: {err}");
        }
        if let Err(err) = e.detect_stage1_fallback() {
            tracing::warn!("checking stage 1 on the ESP: {err}");
        }
        e.refresh();
        e.sync_stage1_trust();
        Ok(e)
    }

    /// After a fallback boot: the other slot was tried and never proven.
    /// Record why (mark-good's health record, when it names that slot and
    /// version), never offer that version again, then invalidate the slot so
    /// the same event is not seen twice. Each step is idempotent and the
    /// state is saved before the GPT changes, so a crash anywhere in
    /// between leads to the same result on the next start.
    pub fn detect_rollback(&mut self) -> Result<(), UpdateError> {
        let table = self.host.storage.gpt(false)?.slot_table();
        let failed = slots::failed_attempts(&table, self.host.booted);
        let Some(&n) = failed.first() else {
            return Ok(());
        };
        let label = Slot::from_partition_number(n)
            .map_or_else(|| format!("partition {n}"), |s| s.label().to_string());
        let version = self.slots().ok().and_then(|v| v.entry(n)?.version.clone());
        let vs = version
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |v| v.to_string());
        let record_path = self.host.root.join(nimbus::boot::HEALTH_FAILURE_PATH);
        let record = std::fs::read(&record_path)
            .ok()
            .and_then(|b| nimbus::boot::HealthFailure::parse(&b).ok())
            .filter(|h| h.partition == n && h.version == vs);
        let (reason, at) = match &record {
            Some(h) => (
                format!("health check failed: {}", h.reason),
                chrono::DateTime::from_timestamp(h.at, 0).unwrap_or_else(Utc::now),
            ),
            None => (
                "it never reached a good health check (it crashed, hung, or failed verification before the check ran)".to_string(),
                self.clock.now(),
            ),
        };
        let rb = crate::status::Rollback {
            failed_version: version.as_ref().map(|v| v.to_string()),
            failed_slot: label.clone(),
            reason,
            at,
            running_version: self.running.to_string(),
        };
        tracing::warn!(
            "rolled back: {label} ({vs}) was given up: {}; running {} from the previous slot",
            rb.reason,
            self.running
        );
        self.persisted.rollback = Some(rb);
        if let Some(v) = &version {
            self.persisted.remember_failed(v);
        }
        self.store.save(&self.persisted)?;
        let mut disk = self.host.storage.gpt(true)?;
        disk.update_slots(|t| slots::invalidate(t, n))?;
        if record.is_some() {
            // Only after the state and the GPT carry the event.
            let _ = std::fs::remove_file(&record_path);
        }
        Ok(())
    }

    pub fn running(&self) -> &Version {
        &self.running
    }

    pub fn store_path(&self) -> &Path {
        self.store.path()
    }

    /// The slots now: one GPT read (`SlotView`).
    pub fn slots(&self) -> Result<SlotView, UpdateError> {
        SlotView::read(self.host.storage.as_ref(), self.host.booted, &self.trust)
    }

    fn passive(&self) -> Result<u32, UpdateError> {
        SlotView {
            booted: self.host.booted,
            entries: Vec::new(),
        }
        .passive()
    }

    /// The version staged in the passive slot for the next boot, if any.
    fn staged(&self) -> Option<Version> {
        self.slots().ok()?.staged()
    }

    /// Re-read config, slots and versions into the status.
    pub fn refresh(&mut self) {
        if let Ok(c) = EngineConfig::load(&self.host.root) {
            self.cfg = c;
        }
        let view = self.slots().ok();
        let infos = view.as_ref().map(SlotView::infos).unwrap_or_default();
        let staged = view.as_ref().and_then(SlotView::staged);
        let cfg = self.cfg.clone();
        let running = self.running.to_string();
        let booted = Slot::from_partition_number(self.host.booted)
            .map_or_else(String::new, |s| s.label().to_string());
        let rollback = self.persisted.rollback.clone();
        let state_reset = self.persisted.state_reset.clone();
        let stage1 = crate::status::Stage1Status {
            running_copy: if self.host.host_mode {
                None
            } else {
                nimbus::esp::running_copy(
                    &nimbus::boot::booted_cmdline(&self.host.root).unwrap_or_default(),
                )
            },
            pending: self.persisted.stage1_pending.clone(),
            failed: self.persisted.stage1_failed.clone(),
            unblessed: if self.host.host_mode {
                None
            } else {
                nimbus::esp::BlessFailure::read(&self.host.root)
            },
        };
        self.shared.update(|s| {
            s.rollback = rollback;
            s.state_reset = state_reset;
            s.stage1 = Some(stage1);
            s.channel = cfg.group.clone();
            s.server = cfg.server.clone().unwrap_or_else(|| "disabled".into());
            s.reboot_strategy = cfg.reboot_strategy.clone();
            s.running_version = running;
            s.booted_slot = booted;
            s.slots = infos;
            if let Some(v) = &staged {
                s.state = State::UpdatedNeedReboot;
                s.new_version = Some(v.to_string());
            }
        });
    }

    fn set_state(&self, st: State) {
        self.shared.update(|s| s.state = st);
    }

    pub fn report_error(&self, e: &UpdateError) {
        tracing::error!(kind = e.kind(), "{e}");
        self.shared.update(|s| {
            s.state = State::ReportingErrorEvent;
            s.progress = None;
            s.last_error = Some(ErrorReport {
                kind: e.kind().to_string(),
                message: e.to_string(),
                at: self.clock.now(),
            });
        });
    }

    /// Learn the trust rotations the repository published since the newest
    /// set this host knows (`trust/<n+1>.json`, until a 404), each checked
    /// against the one before and stored on ROOT before it is used. Done
    /// before the manifest is read, as TUF updates its root first, so a
    /// manifest signed by new keys is understood.
    fn learn_trust(&mut self, server: &str) -> Result<(), UpdateError> {
        let dir = self.host.root.join(nimbus::trust::ROOT_CHAIN_DIR);
        for _ in 0..nimbus::trust::MAX_CHAIN {
            let next = self.trust.newest().version + 1;
            let url = format!("{server}/{}", nimbus::trust::repo_path(next));
            let Some(bytes) = self
                .http
                .get_small_opt(&url, nimbus::trust::MAX_TRUST_BYTES + 1)?
            else {
                return Ok(());
            };
            let sig_url = format!("{url}.sig");
            // A set published without its signatures yet: the next check.
            let Some(sigs) = self.http.get_small_opt(&sig_url, MAX_SIGNATURES_BYTES)? else {
                return Ok(());
            };
            let set =
                nimbus::trust::advance(self.trust.newest(), &bytes, &sigs).map_err(|source| {
                    UpdateError::Trust {
                        url: url.clone(),
                        source,
                    }
                })?;
            std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
            let link = Link {
                version: set.version,
                bytes,
                sigs,
            };
            nimbus::esp::write_chain_in(
                &nimbus::esp::DirEsp(self.host.root.clone()),
                nimbus::trust::ROOT_CHAIN_DIR,
                std::slice::from_ref(&link),
            )
            .map_err(|e| UpdateError::Config {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
            tracing::info!("learned trust set {} from {url}", set.summary());
            self.trust.sets.push(set);
            self.trust.links.push(link);
            self.settle_active();
        }
        Ok(())
    }

    /// Fetch a stage-1 file whole (size and sha256 from the signed manifest).
    fn fetch_file(&self, f: &nimbus::release::FileRef) -> Result<Vec<u8>, UpdateError> {
        use sha2::Digest;
        let server = self.cfg.server.clone().ok_or(UpdateError::Disabled)?;
        let url = format!("{server}/{}", f.path);
        let mut body = self.http.get_from(&url, 0)?;
        let mut out = Vec::with_capacity(f.size as usize);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = body.read_some(&mut buf)?;
            if n == 0 {
                break;
            }
            if out.len() as u64 + n as u64 > f.size {
                return Err(UpdateError::PayloadTooLarge {
                    url,
                    expected: f.size,
                });
            }
            out.extend_from_slice(&buf[..n]);
        }
        if (out.len() as u64) < f.size {
            return Err(UpdateError::Truncated {
                url,
                got: out.len() as u64,
                expected: f.size,
            });
        }
        let got = hex::encode(sha2::Sha256::digest(&out));
        if got != f.sha256 {
            return Err(UpdateError::CompressedHash {
                url,
                got,
                expected: f.sha256.clone(),
            });
        }
        Ok(out)
    }

    fn fetch_manifest(&mut self, channel: &str) -> Result<Manifest, UpdateError> {
        let server = self.cfg.server.clone().ok_or(UpdateError::Disabled)?;
        self.learn_trust(&server)?;
        let url = format!("{server}/channels/{channel}.json");
        // One byte over the limit is enough for the verifier to say "too large".
        let bytes = self
            .http
            .get_small(&url, MAX_MANIFEST_BYTES + 1, &|| {
                UpdateError::UnknownChannel {
                    channel: channel.to_string(),
                    url: url.clone(),
                }
            })
            .map_err(|e| match e {
                UpdateError::ResponseTooLarge { url, limit } => manifest_err(
                    &url,
                    ManifestError::TooLarge {
                        size: limit,
                        limit: MAX_MANIFEST_BYTES,
                    },
                ),
                e => e,
            })?;
        let sig_url = format!("{url}.sig");
        let sigs = self.http.get_small(&sig_url, MAX_SIGNATURES_BYTES, &|| {
            UpdateError::SignatureMissing {
                url: sig_url.clone(),
            }
        })?;
        let policy = ManifestPolicy {
            channel,
            now: self.clock.now(),
            last_serial: self.persisted.last_serial.get(channel).copied(),
        };
        let m = Manifest::verify(&bytes, &sigs, self.trust.newest(), &policy)
            .map_err(|e| manifest_err(&url, e))?;
        if policy.last_serial != Some(m.serial) {
            self.persisted
                .last_serial
                .insert(channel.to_string(), m.serial);
            self.store.save(&self.persisted)?;
        }
        Ok(m)
    }

    /// Fetch and verify the channel, decide. Changes nothing on disk but the
    /// accepted serial.
    pub fn check(&mut self) -> Result<CheckResult, UpdateError> {
        self.refresh();
        self.shared.update(|s| {
            s.state = State::CheckingForUpdate;
            s.last_error = None;
            s.note = None;
        });
        let channel = self.cfg.group.clone();
        let manifest = self.fetch_manifest(&channel)?;
        let allow_down = self.persisted.allow_downgrade.as_deref() == Some(channel.as_str());
        let seed = self.persisted.rollout_seed.unwrap_or(0.0);
        let mut choice = choose::choose_excluding(
            &manifest,
            &self.running,
            seed,
            self.clock.now(),
            allow_down,
            &self.persisted.failed_versions,
        );
        if let (Choice::Offer(r), Err(why)) = (&choice, self.ensure_proven()) {
            choice = Choice::Nothing(format!("{} is available; {why}", r.version));
        }
        let staged = self.staged();
        if let (Choice::Offer(r), Some(v)) = (&choice, &staged) {
            if r.version == *v {
                choice = Choice::Nothing(format!("{v} is already staged for the next boot"));
            }
        }
        let (state, note, newv) = match &choice {
            Choice::Offer(r) => (State::UpdateAvailable, None, Some(r.version.to_string())),
            Choice::Nothing(why) | Choice::Wait { reason: why, .. } => match &staged {
                Some(v) => (
                    State::UpdatedNeedReboot,
                    Some(why.clone()),
                    Some(v.to_string()),
                ),
                None => (State::Idle, Some(why.clone()), None),
            },
        };
        self.shared.update(|s| {
            s.state = state;
            s.note = note;
            s.new_version = newv;
            s.last_check = Some(self.clock.now());
        });
        Ok(CheckResult { manifest, choice })
    }

    /// Check and, if something is offered, install it. Returns the version
    /// staged, if any.
    pub fn update(&mut self) -> Result<Option<Version>, UpdateError> {
        let res = self.check()?;
        match res.choice {
            Choice::Offer(r) => {
                let server = self.cfg.server.clone().ok_or(UpdateError::Disabled)?;
                let url = format!("{server}/{}", r.payload);
                self.install(&r, &url, None)?;
                Ok(Some(r.version))
            }
            _ => Ok(None),
        }
    }

    /// Air-gapped: the same verification as online, payload from a file.
    pub fn apply_file(
        &mut self,
        payload: &Path,
        manifest: &Path,
        signatures: &Path,
    ) -> Result<Version, UpdateError> {
        let read = |p: &Path, limit: usize| -> Result<Vec<u8>, UpdateError> {
            let md = std::fs::metadata(p).map_err(io_at(p))?;
            if md.len() > limit as u64 {
                return Err(manifest_err(
                    &p.display().to_string(),
                    ManifestError::TooLarge {
                        size: md.len() as usize,
                        limit,
                    },
                ));
            }
            std::fs::read(p).map_err(io_at(p))
        };
        let bytes = read(manifest, MAX_MANIFEST_BYTES)?;
        let sigs = read(signatures, MAX_SIGNATURES_BYTES)?;
        let channel = self.cfg.group.clone();
        let policy = ManifestPolicy {
            channel: &channel,
            now: self.clock.now(),
            last_serial: self.persisted.last_serial.get(&channel).copied(),
        };
        let m = Manifest::verify(&bytes, &sigs, self.trust.newest(), &policy)
            .map_err(|e| manifest_err(&manifest.display().to_string(), e))?;
        self.persisted.last_serial.insert(channel.clone(), m.serial);
        self.store.save(&self.persisted)?;
        let allow_down = self.persisted.allow_downgrade.as_deref() == Some(channel.as_str());
        match choose::choose_excluding(
            &m,
            &self.running,
            self.persisted.rollout_seed.unwrap_or(0.0),
            self.clock.now(),
            allow_down,
            &self.persisted.failed_versions,
        ) {
            Choice::Offer(r) => {
                self.install(&r, &payload.display().to_string(), Some(payload))?;
                Ok(r.version)
            }
            Choice::Nothing(why) | Choice::Wait { reason: why, .. } => {
                Err(UpdateError::Refused(why))
            }
        }
    }

    /// Switch channels: GROUP is edited atomically only when the new
    /// channel exists and verifies, and an older offer needs the operator's
    /// explicit allowance.
    pub fn set_channel(
        &mut self,
        name: &str,
        allow_downgrade: bool,
    ) -> Result<String, UpdateError> {
        if !nimbus::release::valid_channel_name(name) {
            return Err(UpdateError::Refused(format!(
                "{name:?} is not a channel name ([a-z0-9._-]{{1,64}})"
            )));
        }
        let m = self.fetch_manifest(name)?;
        let newest = m
            .releases
            .iter()
            .filter(|r| m.max_version.as_ref().is_none_or(|max| r.version <= *max))
            .map(|r| r.version.clone())
            .max();
        let msg;
        match &newest {
            Some(v) if *v < self.running && !allow_downgrade => {
                return Err(UpdateError::Downgrade {
                    channel: name.to_string(),
                    offered: v.to_string(),
                    running: self.running.to_string(),
                })
            }
            Some(v) if *v < self.running => {
                msg = format!("switched to {name}; it offers {v}, older than the running {}: the downgrade is allowed and will be installed", self.running);
                self.persisted.allow_downgrade = Some(name.to_string());
            }
            Some(v) if *v == self.running => {
                msg = format!(
                    "switched to {name}; it offers nothing newer than the running {}",
                    self.running
                );
                self.persisted.allow_downgrade = None;
            }
            Some(v) => {
                msg = format!(
                    "switched to {name}; it offers {v}, newer than the running {}",
                    self.running
                );
                self.persisted.allow_downgrade = None;
            }
            None => {
                msg = format!("switched to {name}; it offers no releases yet");
                self.persisted.allow_downgrade = None;
            }
        }
        write_group(&self.host.root, name)?;
        self.store.save(&self.persisted)?;
        self.refresh();
        Ok(msg)
    }

    pub fn rollback(&mut self) -> Result<String, UpdateError> {
        let mut disk = self.host.storage.gpt(true)?;
        let booted = self.host.booted;
        // A slot signed by keys since removed would only be refused by
        // stage 1 at the next boot: say so now, and change nothing.
        let target = slots::rollback_target(&disk.slot_table(), booted).map_err(|source| {
            UpdateError::Gpt(GptError::Slot {
                path: self.host.disk.clone(),
                source,
            })
        })?;
        if let Some(slot) = Slot::from_partition_number(target) {
            let b = disk.read_descriptor(slot)?;
            if let Err(e) = SlotDescriptor::verify(&b, self.trust.newest()) {
                return Err(UpdateError::Refused(format!(
                    "not rolling back: {slot} has no valid descriptor under trust set version {} ({e})",
                    self.trust.newest().version
                )));
            }
        }
        let target = disk.update_slots(|t| slots::rollback(t, booted))?;
        self.refresh();
        Ok(format!("partition {target} boots next"))
    }

    pub fn mark_good(&mut self) -> Result<String, UpdateError> {
        let mut disk = self.host.storage.gpt(true)?;
        let booted = self.host.booted;
        disk.update_slots(|t| slots::mark_good(t, booted))?;
        self.refresh();
        Ok(format!("partition {booted} marked good"))
    }
}

/// Set GROUP in /etc/nimbus/update.conf, keeping every other line, with a
/// crash-safe replace.
pub fn write_group(root: &Path, name: &str) -> Result<(), UpdateError> {
    let path = root.join(nimbus::updateconf::ETC_PATH);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let mut conf =
        nimbus::updateconf::UpdateConf::parse(&text).map_err(|e| UpdateError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    conf.set("GROUP", name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    }
    nimbus::durable::write_atomic_keep_mode(&path, conf.render().as_bytes(), conf.new_file_mode())
        .map_err(|e| UpdateError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })
}

#[cfg(test)]
mod unit;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn channel_switch_keeps_a_secret_update_conf_secret() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join(nimbus::updateconf::ETC_PATH);
        std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
        std::fs::write(&conf, "ETCD_PASSWORD=hunter2\nGROUP=stable\n").unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
        super::write_group(d.path(), "beta").unwrap();
        assert_eq!(
            std::fs::read_to_string(&conf).unwrap(),
            "ETCD_PASSWORD=hunter2\nGROUP=beta\n"
        );
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A new file: 0644 without a credential in it.
        let d2 = tempfile::tempdir().unwrap();
        super::write_group(d2.path(), "beta").unwrap();
        let p2 = d2.path().join(nimbus::updateconf::ETC_PATH);
        assert_eq!(
            std::fs::metadata(p2).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
}
