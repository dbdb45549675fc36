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
use crate::fetch::Http;
use crate::state::{Persisted, Store};
use crate::status::{ErrorReport, SlotInfo, State, Status};
use crate::target::SlotDevice;

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
            std::fs::read_to_string("/proc/cmdline").map_err(io_at(Path::new("/proc/cmdline")))?;
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
                run_dir: root.join("run/nimbus/mnt"),
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
    http: Http,
    pub shared: std::sync::Arc<Shared>,
    running: Version,
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
        let http = Http::new(opts.connect_timeout, opts.read_timeout, opts.fetch_deadline)?;
        let mut e = Engine {
            host,
            cfg,
            store,
            persisted,
            trust,
            http,
            shared,
            running: Version::new(0, 0, 0),
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
        let version = self.slot_version(n).ok().flatten();
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
                Utc::now(),
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

    fn passive(&self) -> Result<u32, UpdateError> {
        let booted = Slot::from_partition_number(self.host.booted).ok_or_else(|| {
            UpdateError::NoBootedSlot(format!("partition {} is not a USR slot", self.host.booted))
        })?;
        Ok(booted.other().partition_number())
    }

    /// The verified version in a slot, `None` when it holds no valid one:
    /// the booted slot under the set it booted with, the other under the
    /// newest (a slot signed by a removed key is shown as invalid).
    fn slot_version(&self, number: u32) -> Result<Option<Version>, UpdateError> {
        let mut d = self.host.storage.gpt(false)?;
        let Some(slot) = Slot::from_partition_number(number) else {
            return Ok(None);
        };
        let b = d.read_descriptor(slot)?;
        let trust = if number == self.host.booted {
            self.trust.active()
        } else {
            self.trust.newest()
        };
        Ok(SlotDescriptor::verify(&b, trust).ok().map(|d| d.version))
    }

    /// The version staged in the passive slot for the next boot, if any.
    fn staged(&self) -> Option<Version> {
        let passive = self.passive().ok()?;
        let d = self.host.storage.gpt(false).ok()?;
        let table = d.slot_table();
        let e = table.iter().find(|e| e.number == passive)?;
        let booted = table.iter().find(|e| e.number == self.host.booted)?;
        let p = e.prio();
        if p.bootable() && !p.successful && p.priority > booted.prio().priority {
            self.slot_version(passive).ok().flatten()
        } else {
            None
        }
    }

    /// Re-read config, slots and versions into the status.
    pub fn refresh(&mut self) {
        if let Ok(c) = EngineConfig::load(&self.host.root) {
            self.cfg = c;
        }
        let mut infos = Vec::new();
        if let Ok(d) = self.host.storage.gpt(false) {
            for e in d.slot_table() {
                let p = e.prio();
                infos.push(SlotInfo {
                    label: Slot::from_partition_number(e.number)
                        .map_or_else(|| format!("#{}", e.number), |s| s.label().to_string()),
                    partition: e.number,
                    priority: p.priority,
                    tries: p.tries,
                    successful: p.successful,
                    version: self
                        .slot_version(e.number)
                        .ok()
                        .flatten()
                        .map(|v| v.to_string()),
                    booted: e.number == self.host.booted,
                });
            }
        }
        let staged = self.staged();
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
                    &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
                )
            },
            pending: self.persisted.stage1_pending.clone(),
            failed: self.persisted.stage1_failed.clone(),
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
                at: Utc::now(),
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

    /// The stage-1 copy running: the loader's `nimbus.stage1=`, or in host
    /// mode the copy GRUB would start.
    fn running_copy(&self) -> Option<nimbus::esp::Copy> {
        if self.host.host_mode {
            let mut c = None;
            let _ = self.host.esp.with(false, &mut |fs| {
                c = Some(nimbus::esp::grubenv(fs)?.default_copy());
                Ok(())
            });
            return c;
        }
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        nimbus::esp::running_copy(&cmdline)
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

    /// Install the release's stage 1 into the ESP's other copy, unless the
    /// running copy already is it, or it failed to boot here before.
    fn install_stage1(
        &mut self,
        r: &Release,
        s1: &nimbus::release::Stage1Files,
    ) -> Result<(), UpdateError> {
        use sha2::Digest;
        let Some(running) = self.running_copy() else {
            tracing::info!("stage 1: the loader did not say which copy runs; not updating it");
            return Ok(());
        };
        let (ks, is) = (&s1.kernel.sha256, &s1.initramfs.sha256);
        if self.persisted.stage1_failed.as_ref().is_some_and(|f| {
            f.blocked && &f.install.kernel_sha256 == ks && &f.install.initramfs_sha256 == is
        }) {
            tracing::warn!(
                "stage 1 of {}: it did not boot here before; not installed again",
                r.version
            );
            return Ok(());
        }
        let mut same = false;
        self.host
            .esp
            .with(false, &mut |fs| {
                let h = |rel: &str| -> Result<Option<String>, nimbus::esp::EspError> {
                    Ok(fs
                        .read(rel, nimbus::release::MAX_STAGE1_FILE as usize)?
                        .map(|b| hex::encode(sha2::Sha256::digest(&b))))
                };
                same = h(&running.kernel())?.as_ref() == Some(ks)
                    && h(&running.initramfs())?.as_ref() == Some(is);
                Ok(())
            })
            .map_err(|e| self.esp_err(e))?;
        if same {
            return Ok(());
        }
        let kernel = self.fetch_file(&s1.kernel)?;
        let initramfs = self.fetch_file(&s1.initramfs)?;
        let label = r.version.to_string();
        let mut done = None;
        self.host
            .esp
            .with(true, &mut |fs| {
                done = Some(nimbus::esp::install_stage1(
                    fs,
                    running,
                    &kernel,
                    &initramfs,
                    &label,
                    nimbus::boot::KERNEL_CMDLINE,
                )?);
                Ok(())
            })
            .map_err(|e| self.esp_err(e))?;
        if let Some((copy, generation)) = done {
            tracing::info!(
                "stage 1 of {label} installed into ESP copy {copy} (generation {generation}); \
                 the next boot tries it once, copy {running} stays the fallback"
            );
            self.persisted.stage1_pending = Some(crate::state::Stage1Install {
                version: label,
                copy,
                generation,
                kernel_sha256: ks.clone(),
                initramfs_sha256: is.clone(),
                booted: false,
            });
            self.store.save(&self.persisted)?;
        }
        Ok(())
    }

    fn esp_err(&self, e: nimbus::esp::EspError) -> UpdateError {
        UpdateError::Config {
            path: self.host.disk.clone(),
            reason: format!("EFI system partition: {e}"),
        }
    }

    /// After a boot: a stage 1 on trial that the loader gave up (it never
    /// came up to mark-good) is reported, cleared from the loaders, and
    /// never installed again; one that booted is done.
    pub fn detect_stage1_fallback(&mut self) -> Result<(), UpdateError> {
        let Some(running) = self.running_copy() else {
            return Ok(());
        };
        let mut failed = None;
        self.host
            .esp
            .with(true, &mut |fs| {
                failed = nimbus::esp::failed_trial(fs, running)?;
                if failed.is_some() {
                    nimbus::esp::clear_trial(fs, running)?;
                }
                Ok(())
            })
            .map_err(|e| self.esp_err(e))?;
        let pending = self.persisted.stage1_pending.clone();
        match (failed, pending) {
            (Some(f), p) => {
                let install = p.unwrap_or(crate::state::Stage1Install {
                    version: "unknown".into(),
                    copy: f.copy,
                    generation: f.gen.unwrap_or(0),
                    kernel_sha256: String::new(),
                    initramfs_sha256: String::new(),
                    booted: false,
                });
                let (reason, blocked) = if install.booted {
                    (
                        "it booted, but the slot it started was not marked good".to_string(),
                        false,
                    )
                } else {
                    (
                        "it never came up (the loader spent its one try and went back)".to_string(),
                        true,
                    )
                };
                tracing::warn!(
                    "stage 1 of {} (ESP copy {}) was given up: {reason}; running copy {running}",
                    install.version,
                    install.copy
                );
                self.persisted.stage1_failed = Some(crate::state::Stage1Failure {
                    install,
                    running_copy: running,
                    reason,
                    blocked,
                    at: Utc::now(),
                });
                self.persisted.stage1_pending = None;
                self.store.save(&self.persisted)?;
            }
            (None, Some(mut p)) if p.copy == running && !self.host.host_mode => {
                let mut blessed = false;
                let _ = self.host.esp.with(false, &mut |fs| {
                    let env = nimbus::esp::grubenv(fs)?;
                    blessed = env.trial().is_none() && env.default_copy() == running;
                    Ok(())
                });
                if blessed {
                    self.persisted.stage1_pending = None;
                    self.persisted.stage1_failed = None;
                } else if !p.booted {
                    p.booted = true;
                    self.persisted.stage1_pending = Some(p);
                }
                self.store.save(&self.persisted)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The newest set the booted slot verifies under.
    fn settle_active(&mut self) {
        let Some(slot) = Slot::from_partition_number(self.host.booted) else {
            return;
        };
        let Ok(desc) = self
            .host
            .storage
            .gpt(false)
            .and_then(|mut d| d.read_descriptor(slot))
        else {
            return;
        };
        if let Some(i) = (self.trust.active..self.trust.sets.len())
            .rev()
            .find(|&i| SlotDescriptor::verify(&desc, &self.trust.sets[i]).is_ok())
        {
            self.trust.active = i;
        }
        self.publish_trust();
    }

    /// Give stage 1 (through the ESP) the rotations up to the active set,
    /// once the booted slot is proven: before that, a fallback to the other
    /// slot must still find the keys that signed it. Never fatal: stage 1
    /// keeps booting with what it has.
    pub fn sync_stage1_trust(&mut self) {
        let want = self.trust.active().version;
        if self.trust.esp_version.is_some_and(|v| v >= want) || !self.booted_is_good() {
            return;
        }
        let on_esp = match read_esp_chain(&*self.host.esp) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("reading the trust rotations on the ESP: {e}");
                return;
            }
        };
        let have: std::collections::BTreeSet<u64> = on_esp.iter().map(|l| l.version).collect();
        let missing: Vec<Link> = self
            .trust
            .links
            .iter()
            .filter(|l| l.version <= want && !have.contains(&l.version))
            .cloned()
            .collect();
        if !missing.is_empty() {
            if let Err(e) = self
                .host
                .esp
                .with(true, &mut |fs| nimbus::esp::write_chain(fs, &missing))
            {
                tracing::warn!("copying trust rotations to the ESP: {e}");
                return;
            }
            tracing::info!(
                "stage 1 will use trust set {} from the next boot",
                self.trust.active().summary()
            );
        }
        self.trust.esp_version = Some(want.max(have.last().copied().unwrap_or(0)));
        self.publish_trust();
    }

    fn publish_trust(&self) {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let stage1 = if self.host.host_mode {
            None
        } else {
            nimbus::trust::parse_cmdline_arg(&cmdline)
        };
        let t = &self.trust;
        let info = crate::status::TrustStatus {
            usr: crate::status::TrustSetInfo::of(t.newest()),
            usr_builtin_version: t.sets[0].version,
            active_version: t.active().version,
            esp_version: t.esp_version,
            stage1,
            chain_error: t.chain_error.clone(),
        };
        self.shared.update(|s| s.trust = Some(info));
    }

    fn fetch_manifest(&mut self, channel: &str) -> Result<Manifest, UpdateError> {
        let server = self.cfg.server.clone().ok_or(UpdateError::Disabled)?;
        self.learn_trust(&server)?;
        let url = format!("{server}/channels/{channel}.json");
        // One byte over the limit is enough for the verifier to say "too large".
        let bytes = self
            .http
            .get_small(&url, MAX_MANIFEST_BYTES + 1, || {
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
        let sigs = self.http.get_small(&sig_url, MAX_SIGNATURES_BYTES, || {
            UpdateError::SignatureMissing {
                url: sig_url.clone(),
            }
        })?;
        let policy = ManifestPolicy {
            channel,
            now: Utc::now(),
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
            Utc::now(),
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
            s.last_check = Some(Utc::now());
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
            now: Utc::now(),
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
            Utc::now(),
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

    /// Installing overwrites the passive slot, which is the fallback while
    /// the running slot is unproven: wait for mark-good first, as ChromeOS
    /// and Flatcar do.
    fn ensure_proven(&self) -> Result<(), UpdateError> {
        if self.booted_is_good() {
            return Ok(());
        }
        let label = |n: u32| {
            Slot::from_partition_number(n)
                .map_or_else(|| format!("partition {n}"), |s| s.label().to_string())
        };
        Err(UpdateError::Unproven {
            slot: label(self.host.booted),
            other: label(self.passive()?),
        })
    }

    fn install(&mut self, r: &Release, url: &str, file: Option<&Path>) -> Result<(), UpdateError> {
        let result = self.install_inner(r, url, file);
        if let Err(e) = &result {
            if poisons_checkpoint(e) && self.persisted.checkpoint.is_some() {
                // The bytes behind the checkpoint (a stale mirror, a brief
                // man in the middle on http) did not make the payload the
                // manifest names: resuming from them would fail the same
                // way on every attempt until a new release.
                tracing::warn!(
                    "install of {} failed verification ({e}); dropping its checkpoint, the next attempt starts from the beginning",
                    r.version
                );
                self.persisted.checkpoint = None;
                self.store.save(&self.persisted)?;
            }
        }
        result
    }

    fn install_inner(
        &mut self,
        r: &Release,
        url: &str,
        file: Option<&Path>,
    ) -> Result<(), UpdateError> {
        self.ensure_proven()?;
        let passive = self.passive()?;
        if passive == self.host.booted {
            return Err(UpdateError::BootedSlot {
                disk: self.host.disk.clone(),
                partition: passive,
            });
        }
        let mut disk = self.host.storage.gpt(true)?;
        disk.check_nimbus_layout()?;
        let part = disk.partition(passive)?;
        let booted_part = {
            let b = disk.partition(self.host.booted)?;
            (b.offset_bytes(), b.size_bytes())
        };
        if r.raw_size > part.size_bytes() {
            return Err(UpdateError::TooLargeForSlot {
                version: r.version.to_string(),
                raw_size: r.raw_size,
                partition: passive,
                slot_size: part.size_bytes(),
            });
        }
        // A checkpoint is only worth anything if the slot stayed invalid
        // since it was written (nobody booted or prioritised it meanwhile).
        let invalid_now = part.prio() == slots::Prio::default();
        let resume = self.persisted.checkpoint.clone().filter(|_| invalid_now);
        if !invalid_now {
            disk.update_slots(|t| slots::invalidate(t, passive))?;
        }
        if resume.is_none() && self.persisted.checkpoint.is_some() {
            self.persisted.checkpoint = None;
            self.store.save(&self.persisted)?;
        }
        drop(disk);
        self.shared.cancel.store(false, Ordering::SeqCst);
        let newv = r.version.to_string();
        self.shared.update(|s| {
            s.state = State::Downloading;
            s.new_version = Some(newv);
            s.progress = None;
        });
        let slot = self
            .host
            .storage
            .slot(passive, part.offset_bytes(), part.size_bytes())?;
        let mut delta_fallback = None;
        let mut delta_report = None;
        if let (Some(df), None) = (&r.delta, file) {
            // Blocks of the target already in the passive slot: a delta or
            // a full install of this release that was interrupted.
            let written = self.written_blocks(r, passive, resume.as_ref(), invalid_now);
            // What the full payload still needs: all of it, or the rest
            // after its checkpoint.
            let full_left = r.compressed_size - resume.as_ref().map_or(0, |c| c.comp_offset);
            match self.install_delta(r, df, &slot, &booted_part, written, full_left) {
                Ok(Ok(rep)) => delta_report = Some(rep),
                Ok(Err(why)) => {
                    tracing::info!("{}: full payload: {why}", r.version);
                    delta_fallback = Some(why);
                }
                Err(e) if delta_falls_back(&e) => {
                    tracing::warn!(
                        "{}: delta failed ({e}); applying the full payload",
                        r.version
                    );
                    delta_fallback = Some(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        let report = match delta_report {
            Some(rep) => rep,
            None => {
                let mut rep = self.install_full(r, url, file, &slot, resume)?;
                rep.delta_fallback = delta_fallback;
                rep
            }
        };
        self.shared.update(|s| s.last_apply = Some(report));
        self.set_state(State::Verifying);
        let bytes = slot.read_descriptor()?;
        let desc_err = |reason: String| UpdateError::Descriptor {
            disk: self.host.disk.clone(),
            partition: passive,
            reason,
        };
        let d = SlotDescriptor::verify(&bytes, self.trust.newest())
            .map_err(|e| desc_err(e.to_string()))?;
        // Stage 1 checks the slot under the set on the ESP, which follows
        // the active set: a slot signed only by keys it does not trust yet
        // would never boot, so it is not staged (docs/security.md: sign
        // one release with old and new keys).
        if let Err(e) = SlotDescriptor::verify(&bytes, self.trust.active()) {
            return Err(desc_err(format!(
                "signed only by keys that stage 1 does not trust yet (it has trust set {}): {e}; \
                 the release that rotates keys must also be signed by the keys the host boots with",
                self.trust.active().summary()
            )));
        }
        if d.version != r.version {
            return Err(desc_err(format!(
                "descriptor says version {}, the manifest {}",
                d.version, r.version
            )));
        }
        if hex::encode(d.verity_root) != r.verity_root {
            return Err(desc_err(format!(
                "verity root {} differs from the manifest's {}",
                hex::encode(d.verity_root),
                r.verity_root
            )));
        }
        if d.payload_end() + nimbus::release::DESCRIPTOR_SIZE as u64 != r.raw_size {
            return Err(desc_err(format!(
                "descriptor covers {} bytes, the payload has {}",
                d.payload_end(),
                r.raw_size
            )));
        }

        // Stage 1 goes into the ESP's other copy before the slot becomes
        // bootable: whichever the next boot meets first, its files are
        // whole (nimbus::esp's write order).
        if let (None, Some(s1)) = (file, &r.stage1) {
            self.install_stage1(r, s1)?;
        }

        self.set_state(State::Finalizing);
        let mut disk = self.host.storage.gpt(true)?;
        disk.update_slots(|t| slots::prioritize(t, passive))?;
        self.persisted.checkpoint = None;
        self.persisted.delta_checkpoint = None;
        self.persisted.rollback = None;
        self.persisted.state_reset = None;
        if self.persisted.allow_downgrade.as_deref() == Some(self.cfg.group.as_str()) {
            self.persisted.allow_downgrade = None;
        }
        self.store.save(&self.persisted)?;
        self.refresh();
        let strategy = self.cfg.reboot_strategy.clone();
        self.shared.update(|s| {
            s.state = State::UpdatedNeedReboot;
            s.progress = None;
            s.note = Some(match strategy.as_str() {
                "off" => {
                    "reboot to use the new version (REBOOT_STRATEGY=off: not rebooting by itself)"
                        .into()
                }
                _ => "reboot to use the new version".into(),
            });
        });
        Ok(())
    }

    /// The full payload, streamed (`apply`), resuming from `resume`.
    fn install_full(
        &mut self,
        r: &Release,
        url: &str,
        file: Option<&Path>,
        slot: &SlotDevice,
        resume: Option<crate::state::Checkpoint>,
    ) -> Result<crate::status::ApplyReport, UpdateError> {
        let shared = self.shared.clone();
        let progress = move |p: crate::status::Progress| shared.update(|s| s.progress = Some(p));
        let persisted = Mutex::new(self.persisted.clone());
        let result = {
            let store = &self.store;
            let checkpoint = |cp: &crate::state::Checkpoint| {
                let mut p = match persisted.lock() {
                    Ok(p) => p,
                    Err(e) => e.into_inner(),
                };
                p.checkpoint = Some(cp.clone());
                store.save(&p)
            };
            let job = apply::Job {
                http: &self.http,
                url: url.to_string(),
                file,
                release: r,
                slot,
                resume,
                write_bps: self.cfg.write_bps,
                io_idle: self.cfg.io_idle,
                cancel: &self.shared.cancel,
                progress: &progress,
                checkpoint: &checkpoint,
            };
            apply::run(&job)
        };
        // Keep the checkpoints written during the attempt even when it
        // failed: the daemon's next attempt resumes from them, and a later
        // save of the state must not drop them.
        self.persisted = match persisted.into_inner() {
            Ok(p) => p,
            Err(e) => e.into_inner(),
        };
        let out = result?;
        tracing::info!(
            downloaded = out.downloaded,
            resumed_from = out.resumed_from,
            direct_io = out.direct_io,
            "payload {} written to partition {} ({})",
            r.version,
            slot.partition,
            out.io_limit
        );
        Ok(crate::status::ApplyReport {
            version: r.version.to_string(),
            written: out.written,
            downloaded: out.downloaded,
            resumed_from: out.resumed_from,
            seconds: (out.seconds * 1000.0).round() / 1000.0,
            io_limit: out.io_limit.clone(),
            direct_io: out.direct_io,
            mode: "full".into(),
            delta: None,
            delta_fallback: None,
        })
    }

    /// Data blocks of `r` known to be in the passive slot already: from a
    /// delta or full checkpoint of the same release, while the slot has
    /// stayed invalid since.
    fn written_blocks(
        &self,
        r: &Release,
        passive: u32,
        full: Option<&crate::state::Checkpoint>,
        invalid_now: bool,
    ) -> u64 {
        if !invalid_now {
            return 0;
        }
        let from_delta = self
            .persisted
            .delta_checkpoint
            .as_ref()
            .filter(|c| {
                c.version == r.version.to_string()
                    && c.raw_sha256 == r.raw_sha256
                    && c.partition == passive
            })
            .map_or(0, |c| c.blocks);
        let from_full = full
            .filter(|c| c.version == r.version.to_string() && c.partition == passive)
            .map_or(0, |c| c.raw_offset / nimbus::delta::BLOCK as u64);
        from_delta.max(from_full)
    }

    /// Rebuild the passive slot from local blocks and fetched frames.
    /// `Ok(Err(why))`: a delta is not worth it here; nothing was written.
    fn install_delta(
        &mut self,
        r: &Release,
        df: &nimbus::release::DeltaFiles,
        slot: &SlotDevice,
        booted_part: &(u64, u64),
        written: u64,
        full_left: u64,
    ) -> Result<Result<crate::status::ApplyReport, String>, UpdateError> {
        let server = self.cfg.server.clone().ok_or(UpdateError::Disabled)?;
        let index_url = format!("{server}/{}", df.index.path);
        let pack_url = format!("{server}/{}", df.pack.path);
        let t0 = std::time::Instant::now();
        self.set_state(State::Downloading);
        let bytes = self.fetch_file(&df.index)?;
        let index = nimbus::delta::Index::parse(&bytes).map_err(|e| UpdateError::DeltaIndex {
            url: index_url.clone(),
            reason: e.to_string(),
        })?;
        if index.pack_size() != df.pack.size {
            return Err(UpdateError::DeltaIndex {
                url: index_url,
                reason: format!(
                    "its frames add up to {} bytes, the manifest lists a pack of {}",
                    index.pack_size(),
                    df.pack.size
                ),
            });
        }
        let booted = crate::delta::open_booted(
            &self.host.disk,
            booted_part.0,
            booted_part.1,
            self.host.host_mode,
        )?;
        let (booted_map, how) = crate::delta::booted_hashes(&booted, &index.fields.verity_salt)?;
        let passive_map = crate::delta::passive_sources(&index, &booted_map, slot, written)?;
        let plan = crate::delta::plan(&index, &booted_map, &passive_map);
        let share = (plan.fetch_bytes + bytes.len() as u64) as f64 / r.compressed_size as f64;
        tracing::info!(
            "{}: delta plan: {} blocks from the booted slot (found by {how}), {} from the passive slot, {} frames ({} bytes, {:.1} % of the full payload) in {} request(s)",
            r.version,
            plan.booted_blocks,
            plan.passive_blocks,
            plan.frames.len(),
            plan.fetch_bytes,
            share * 100.0,
            plan.ranges.len()
        );
        if share > crate::delta::MAX_SHARE {
            return Ok(Err(format!(
                "the delta would fetch {:.0} % of the full payload (more than {:.0} %)",
                share * 100.0,
                crate::delta::MAX_SHARE * 100.0
            )));
        }
        if plan.fetch_bytes + bytes.len() as u64 >= full_left {
            return Ok(Err(format!(
                "resuming the full payload fetches less ({full_left} bytes left, the delta needs {})",
                plan.fetch_bytes + bytes.len() as u64
            )));
        }
        let shared = self.shared.clone();
        let progress = move |p: crate::status::Progress| shared.update(|s| s.progress = Some(p));
        let persisted = Mutex::new(self.persisted.clone());
        let result = {
            let store = &self.store;
            let checkpoint = |blocks: u64| {
                let mut p = match persisted.lock() {
                    Ok(p) => p,
                    Err(e) => e.into_inner(),
                };
                p.delta_checkpoint = Some(crate::state::DeltaCheckpoint {
                    version: r.version.to_string(),
                    raw_sha256: r.raw_sha256.clone(),
                    partition: slot.partition,
                    blocks,
                });
                store.save(&p)
            };
            crate::delta::run(&crate::delta::Job {
                http: &self.http,
                pack_url,
                index: &index,
                plan: &plan,
                release: r,
                slot,
                booted: &booted,
                write_bps: self.cfg.write_bps,
                io_idle: self.cfg.io_idle,
                cancel: &self.shared.cancel,
                progress: &progress,
                checkpoint: &checkpoint,
            })
        };
        self.persisted = match persisted.into_inner() {
            Ok(p) => p,
            Err(e) => e.into_inner(),
        };
        let out = result?;
        tracing::info!(
            fetched = out.fetched,
            requests = out.requests,
            "delta {} written to partition {} ({})",
            r.version,
            slot.partition,
            out.io_limit
        );
        Ok(Ok(crate::status::ApplyReport {
            version: r.version.to_string(),
            written: out.written,
            downloaded: out.fetched + bytes.len() as u64,
            resumed_from: 0,
            seconds: (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            io_limit: out.io_limit,
            direct_io: slot.direct,
            mode: "delta".into(),
            delta: Some(crate::status::DeltaReport {
                blocks: index.data_blocks(),
                from_booted: plan.booted_blocks,
                from_passive: plan.passive_blocks,
                fetched_frames: plan.frames.len() as u64,
                fetched_bytes: out.fetched,
                index_bytes: bytes.len() as u64,
                requests: out.requests + 1,
                percent_of_full: ((out.fetched + bytes.len() as u64) as f64 * 1000.0
                    / r.compressed_size as f64)
                    .round()
                    / 10.0,
                booted_hashes: how.to_string(),
            }),
            delta_fallback: None,
        }))
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

impl Engine {
    /// This host's name in the reboot semaphore: /etc/machine-id.
    pub fn machine_id(&self) -> Result<String, UpdateError> {
        let p = self.host.root.join("etc/machine-id");
        let id = std::fs::read_to_string(&p).map_err(io_at(&p))?;
        let id = id.trim();
        if id.is_empty()
            || id.len() > 128
            || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return Err(UpdateError::Config {
                path: p.clone(),
                reason: format!("{id:?} is not a machine id"),
            });
        }
        Ok(id.to_string())
    }

    fn lock_client(&self) -> Result<crate::lock::LockClient, crate::lock::LockError> {
        crate::lock::LockClient::new(self.cfg.etcd.clone())
    }

    fn booted_is_good(&self) -> bool {
        self.host
            .storage
            .gpt(false)
            .ok()
            .and_then(|d| {
                d.slot_table()
                    .into_iter()
                    .find(|e| e.number == self.host.booted)
            })
            .is_some_and(|e| e.prio().successful)
    }

    /// One step of reboot coordination: give back a lock held from before a
    /// reboot once this boot is good, then judge strategy, window and lock
    /// for a staged update. Returns what to do; the note in the status says
    /// why when the answer is to wait.
    pub fn reboot_step(&mut self) -> Result<crate::policy::Decision, UpdateError> {
        use crate::lock::LockError;
        use crate::policy::{decide, Decision, Lock, Strategy};
        self.refresh();
        self.sync_stage1_trust();
        let staged = self.staged().is_some();
        if let Some(key) = self.persisted.lock_taken.clone() {
            if !staged && self.booted_is_good() {
                let id = self.machine_id()?;
                match self.lock_client().and_then(|c| c.release(&id)) {
                    Ok(held) => {
                        tracing::info!("reboot lock {key}: released by {id} (held: {held}); the booted slot is good");
                        self.persisted.lock_taken = None;
                        self.store.save(&self.persisted)?;
                    }
                    Err(e) => {
                        // Kept in the state file: retried on the next step, never lost.
                        tracing::warn!("reboot lock {key}: cannot release yet: {e}");
                        self.shared.update(|s| {
                            s.note = Some(format!("cannot release the reboot lock yet: {e}"))
                        });
                    }
                }
            }
        }
        let now = chrono::Local::now().naive_local();
        let strategy = self.cfg.strategy;
        let window = self.cfg.window;
        let mut lock = Lock::NotAsked;
        if staged && strategy == Strategy::EtcdLock && window.is_none_or(|w| w.contains(now)) {
            let id = self.machine_id()?;
            lock = match self.lock_client().and_then(|c| c.get()) {
                Ok((s, _)) if s.holders.contains(&id) => Lock::Held,
                Ok((s, _)) if s.semaphore > 0 => Lock::Free,
                Ok((s, _)) => Lock::Full {
                    holders: s.holders,
                    max: s.max.max(0) as u64,
                },
                Err(e) => Lock::Unavailable(e.to_string()),
            };
        }
        let mut d = decide(staged, strategy, window.as_ref(), &lock, now);
        if d == Decision::TakeLock {
            let id = self.machine_id()?;
            let client = self.lock_client();
            // Persist the intent first: a crash right after the CAS must
            // still lead to a release on the next boot.
            let key = crate::lock::key_for(self.cfg.etcd.group.as_deref());
            self.persisted.lock_taken = Some(key.clone());
            self.store.save(&self.persisted)?;
            let got = client.and_then(|c| c.acquire(&id));
            lock = match got {
                Ok(true) => {
                    tracing::info!("reboot lock {key}: taken by {id}");
                    Lock::Held
                }
                Ok(false) => Lock::Full {
                    holders: vec!["other hosts".into()],
                    max: 0,
                },
                Err(LockError::Malformed { key, reason }) => {
                    Lock::Unavailable(format!("{key}: malformed value ({reason})"))
                }
                Err(e) => Lock::Unavailable(e.to_string()),
            };
            // Only a definite "no" clears the intent; after an error the CAS
            // may have gone through, and a release of a slot never held is
            // harmless, so the intent stays.
            if matches!(lock, Lock::Full { .. }) {
                self.persisted.lock_taken = None;
                self.store.save(&self.persisted)?;
            }
            d = decide(staged, strategy, window.as_ref(), &lock, now);
            if let (Decision::Wait { .. }, Ok((s, _))) =
                (&d, self.lock_client().and_then(|c| c.get()))
            {
                d = decide(
                    staged,
                    strategy,
                    window.as_ref(),
                    &Lock::Full {
                        holders: s.holders,
                        max: s.max.max(0) as u64,
                    },
                    now,
                );
            }
        }
        if let Decision::Wait { why, .. } = &d {
            let why = why.clone();
            self.shared.update(|s| s.note = Some(why));
        }
        Ok(d)
    }
}

/// Errors that say the bytes written so far are not the payload's: a
/// checkpoint saved during that attempt must not be resumed from. A cut
/// connection (`Truncated`, network errors) keeps it: that is what
/// checkpoints are for.
fn read_esp_chain(esp: &dyn nimbus::esp::Esp) -> Result<Vec<Link>, nimbus::esp::EspError> {
    let mut out = Vec::new();
    esp.with(false, &mut |fs| {
        out = nimbus::esp::read_chain(fs)?;
        Ok(())
    })?;
    Ok(out)
}

/// USR's built-in set advanced by the rotations stored on ROOT and those
/// on the ESP (the ones stage 1 booted with: ROOT may have been wiped).
/// A rotation that does not verify is reported and left out, never fatal:
/// the host keeps the sets it could check.
fn load_trust(host: &Host) -> Result<TrustView, UpdateError> {
    let p = host.root.join(nimbus::trust::USR_TRUST);
    let builtin = nimbus::trust::load(&p).map_err(|e| UpdateError::Config {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    let dir = host.root.join(nimbus::trust::ROOT_CHAIN_DIR);
    let (mut links, mut read_err) = match nimbus::trust::read_chain_dir(&dir) {
        Ok(l) => (l, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let esp_links = match read_esp_chain(&*host.esp) {
        Ok(l) => l,
        Err(e) => {
            read_err.get_or_insert(format!("ESP: {e}"));
            Vec::new()
        }
    };
    let esp_max = esp_links.iter().map(|l| l.version).max();
    for l in esp_links {
        if !links.iter().any(|x| x.version == l.version) {
            links.push(l);
        }
    }
    let (sets, err) = nimbus::trust::walk(builtin, &links);
    let chain_error = read_err.or(err.map(|e| format!("{}: {e}", dir.display())));
    if let Some(e) = &chain_error {
        tracing::warn!("stored trust rotations: {e}");
    }
    let reached = sets[sets.len() - 1].version;
    links.retain(|l| l.version <= reached);
    Ok(TrustView {
        sets,
        links,
        active: 0,
        chain_error,
        esp_version: esp_max.map(|v| v.min(reached)),
    })
}

/// Delta failures that the full payload may not share: the server, the
/// pack or the index. A cancel, or a slot that cannot be written, stops the
/// install instead.
fn delta_falls_back(e: &UpdateError) -> bool {
    !matches!(
        e,
        UpdateError::Cancelled
            | UpdateError::Io { .. }
            | UpdateError::Gpt(_)
            | UpdateError::WriterStopped
            | UpdateError::Disabled
    )
}

fn poisons_checkpoint(e: &UpdateError) -> bool {
    matches!(
        e,
        UpdateError::CompressedHash { .. }
            | UpdateError::RawHash { .. }
            | UpdateError::Decode { .. }
            | UpdateError::RawTooLarge { .. }
            | UpdateError::RawTooShort { .. }
            | UpdateError::PayloadTooLarge { .. }
            | UpdateError::Descriptor { .. }
    )
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
