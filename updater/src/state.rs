//! What update-engine keeps across restarts and power cuts, in
//! `/var/lib/nimbus/update-engine.json`, always replaced whole with
//! write-new, fsync, rename, fsync-dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::UpdateError;
use crate::sha::SavedState;

pub const STATE_PATH: &str = nimbus::paths::ENGINE_STATE;

/// The whole file. Each part has one owner in the engine (docs/update-engine.md,
/// "Who owns what"), which changes it only through [`Ledger::edit`]; the
/// parts are flattened, so the file's JSON is one flat object whatever the
/// split in code.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
    #[serde(flatten)]
    pub channel: ChannelState,
    #[serde(flatten)]
    pub install: InstallState,
    #[serde(flatten)]
    pub reboot: RebootState,
    #[serde(flatten)]
    pub stage1: Stage1State,
    #[serde(flatten)]
    pub reports: Reports,
}

/// Owned by the channel reader (`engine::channel`): what was accepted from
/// the repository, and what this host will not take again.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChannelState {
    /// Highest manifest serial accepted per channel: older ones are replays.
    #[serde(default)]
    pub last_serial: BTreeMap<String, u64>,
    /// This host's place in staged rollouts, in [0, 1), drawn once.
    #[serde(default)]
    pub rollout_seed: Option<f64>,
    /// The operator allowed a downgrade on this channel (`updatectl channel
    /// NAME --allow-downgrade`); cleared once the downgrade is staged.
    #[serde(default)]
    pub allow_downgrade: Option<String>,
    /// Versions that failed on this host; never offered again (a newer
    /// release is). Newest last, at most [`MAX_FAILED_VERSIONS`].
    #[serde(default)]
    pub failed_versions: Vec<semver::Version>,
}

/// Owned by the installer (`engine::install`): how far an interrupted
/// install got.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstallState {
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// How far a delta install got: its first `blocks` data blocks are
    /// written and synced (valid while the slot stays invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_checkpoint: Option<DeltaCheckpoint>,
}

/// Owned by the reboot coordinator (`engine::reboot`): a lock and hooks
/// that must be undone after the reboot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RebootState {
    /// The etcd key of a reboot lock this host took and has not given back
    /// yet. Persisted before rebooting so the next boot releases it once
    /// the new slot is marked good (or the host rolled back).
    #[serde(default)]
    pub lock_taken: Option<String>,
    /// The pre-reboot hooks ran (or started) for a reboot into this version:
    /// the post-good hooks must run once a slot boots good, before the lock
    /// is given back. Persisted before the first pre-reboot hook starts, so a
    /// crash or power cut during the drain still ends in a reactivation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_good_pending: Option<String>,
}

/// Owned by the stage-1 keeper (`engine::stage1`): stage 1's copies on
/// the ESP.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stage1State {
    /// A stage 1 installed into the ESP's other copy and not yet seen to
    /// boot (blessed by mark-good, or given up by the loader).
    #[serde(default)]
    pub stage1_pending: Option<Stage1Install>,
    /// The last stage 1 that did not come up; reported until the next one
    /// boots, and never installed again (by its hashes).
    #[serde(default)]
    pub stage1_failed: Option<Stage1Failure>,
}

/// Owned by the engine loop: events reported by `updatectl status` until
/// the next install.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reports {
    /// The last automatic rollback.
    #[serde(default)]
    pub rollback: Option<Rollback>,
    /// The state file was damaged and put aside.
    #[serde(default)]
    pub state_reset: Option<StateReset>,
}

/// One owner's part of [`Persisted`].
pub trait Part {
    fn of(p: &mut Persisted) -> &mut Self;
}

macro_rules! part {
    ($t:ty, $f:ident) => {
        impl Part for $t {
            fn of(p: &mut Persisted) -> &mut Self {
                &mut p.$f
            }
        }
    };
}
part!(ChannelState, channel);
part!(InstallState, install);
part!(RebootState, reboot);
part!(Stage1State, stage1);
part!(Reports, reports);

/// The state file and its contents: every change is made through
/// [`Ledger::edit`], which saves the whole file before it returns, so what
/// an owner changed is on disk before it acts on it.
pub struct Ledger {
    store: Store,
    state: Persisted,
}

impl Ledger {
    /// Load (or start) the file under `root`.
    pub fn open(root: &Path) -> Result<Ledger, UpdateError> {
        let store = Store::new(root);
        let state = store.load()?;
        Ok(Ledger { store, state })
    }

    pub fn get(&self) -> &Persisted {
        &self.state
    }

    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// Change one part and save the file. On a failed save the change is
    /// kept in memory (and saved with the next edit): the caller decides
    /// whether to go on.
    pub fn edit<P: Part, R>(&mut self, f: impl FnOnce(&mut P) -> R) -> Result<R, UpdateError> {
        let r = f(P::of(&mut self.state));
        self.store.save(&self.state)?;
        Ok(r)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stage1Install {
    pub version: String,
    pub copy: nimbus::esp::Copy,
    pub generation: u64,
    pub kernel_sha256: String,
    pub initramfs_sha256: String,
    /// It started and handed over to its slot once (update-engine ran
    /// under it), whether or not that slot was then marked good.
    #[serde(default)]
    pub booted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stage1Failure {
    pub install: Stage1Install,
    /// The copy that booted instead.
    pub running_copy: nimbus::esp::Copy,
    pub reason: String,
    /// Never installed again (it did not boot at all); a stage 1 that
    /// booted a slot which then failed its health check is not blamed.
    pub blocked: bool,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// A slot that was tried and never proven good, so the host went back to
/// the one it runs now.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rollback {
    /// The version that failed (`None` when its descriptor is unreadable).
    pub failed_version: Option<String>,
    pub failed_slot: String,
    /// The health check's words, or what is known without them.
    pub reason: String,
    /// When the failure was recorded, or detected when nothing recorded it.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The version running after the rollback.
    pub running_version: String,
}

/// A damaged state file, kept aside so updates go on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateReset {
    /// Where the damaged file was kept.
    pub kept_as: String,
    pub reason: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

pub const MAX_FAILED_VERSIONS: usize = 16;

impl ChannelState {
    pub fn remember_failed(&mut self, v: &semver::Version) {
        if !self.failed_versions.contains(v) {
            self.failed_versions.push(v.clone());
        }
        let extra = self
            .failed_versions
            .len()
            .saturating_sub(MAX_FAILED_VERSIONS);
        self.failed_versions.drain(..extra);
    }
}

/// How far a payload write got, recorded at zstd frame boundaries after the
/// slot data up to `raw_offset` was synced. Never trusted blindly: on resume
/// the slot's first `raw_offset` bytes are hashed again and must reproduce
/// `raw_state`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub version: String,
    pub compressed_sha256: String,
    pub partition: u32,
    pub comp_offset: u64,
    pub raw_offset: u64,
    pub comp_state: SavedState,
    pub raw_state: SavedState,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeltaCheckpoint {
    pub version: String,
    pub raw_sha256: String,
    pub partition: u32,
    pub blocks: u64,
}

/// The ledger while an install runs: the writer's threads record
/// checkpoints through it, each saved at once.
pub struct Saver<'a> {
    ledger: std::sync::Mutex<&'a mut Ledger>,
}

impl<'a> Saver<'a> {
    pub fn new(ledger: &'a mut Ledger) -> Saver<'a> {
        Saver {
            ledger: std::sync::Mutex::new(ledger),
        }
    }

    pub fn edit<P: Part>(&self, f: impl FnOnce(&mut P)) -> Result<(), UpdateError> {
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        l.edit(f)
    }
}

pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(root: &Path) -> Store {
        Store {
            path: root.join(STATE_PATH),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A missing file is a fresh host. A damaged one is kept aside
    /// (`<file>.damaged-<unix time>`) with a loud log line, and the engine
    /// goes on from defaults: the running version still forbids downgrades,
    /// and a replayed older manifest can at worst hide a newer release until
    /// that manifest expires, which beats a host that never updates again.
    /// The reset is recorded for `updatectl status`.
    pub fn load(&self) -> Result<Persisted, UpdateError> {
        match std::fs::read(&self.path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(p) => Ok(p),
                Err(e) => self.put_aside(&e.to_string()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Persisted::default()),
            Err(e) => Err(UpdateError::Io {
                path: self.path.clone(),
                source: e,
            }),
        }
    }

    fn put_aside(&self, reason: &str) -> Result<Persisted, UpdateError> {
        let now = chrono::Utc::now();
        let mut kept = self.path.as_os_str().to_owned();
        kept.push(format!(".damaged-{}", now.timestamp()));
        let kept = PathBuf::from(kept);
        std::fs::rename(&self.path, &kept).map_err(|e| UpdateError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        if let Some(dir) = self.path.parent() {
            nimbus::durable::sync_dir(dir).map_err(|e| UpdateError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        tracing::error!(
            "{}: damaged state file ({reason}); kept as {} and starting over from defaults \
             (accepted manifest serials are forgotten: an older manifest could be replayed \
             until it expires; downgrades stay refused)",
            self.path.display(),
            kept.display()
        );
        let p = Persisted {
            reports: Reports {
                state_reset: Some(StateReset {
                    kept_as: kept.display().to_string(),
                    reason: reason.to_string(),
                    at: now,
                }),
                ..Reports::default()
            },
            ..Persisted::default()
        };
        self.save(&p)?;
        Ok(p)
    }

    pub fn save(&self, p: &Persisted) -> Result<(), UpdateError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(crate::error::io_at(dir))?;
        }
        let mut b = serde_json::to_vec_pretty(p).map_err(|e| UpdateError::Config {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        b.push(b'\n');
        nimbus::durable::write_atomic(&self.path, &b, 0o600).map_err(|e| UpdateError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_stays_one_flat_object_whatever_the_parts_in_code() {
        // A file as update-engine wrote it before the parts existed.
        let old = r#"{
  "last_serial": {"stable": 7},
  "rollout_seed": 0.25,
  "allow_downgrade": null,
  "checkpoint": null,
  "delta_checkpoint": {"version": "1.1.0", "raw_sha256": "ab", "partition": 4, "blocks": 9},
  "lock_taken": "coreos.com/updateengine/rebootlock/semaphore",
  "post_good_pending": "1.1.0",
  "rollback": null,
  "failed_versions": ["1.0.1"],
  "state_reset": null,
  "stage1_pending": null,
  "stage1_failed": null
}"#;
        let p: Persisted = serde_json::from_str(old).unwrap();
        assert_eq!(p.channel.last_serial.get("stable"), Some(&7));
        assert_eq!(p.channel.rollout_seed, Some(0.25));
        assert_eq!(p.channel.failed_versions, vec!["1.0.1".parse().unwrap()]);
        assert_eq!(
            p.install.delta_checkpoint.as_ref().map(|c| c.blocks),
            Some(9)
        );
        assert_eq!(p.reboot.post_good_pending.as_deref(), Some("1.1.0"));
        assert!(p.reboot.lock_taken.is_some());
        let back: serde_json::Value = serde_json::to_value(&p).unwrap();
        let keys: Vec<&str> = back
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let want: serde_json::Value = serde_json::from_str(old).unwrap();
        let mut want: Vec<&str> = want
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        want.sort_unstable();
        assert_eq!(keys, want, "the parts changed the file's keys");
        assert_eq!(serde_json::from_value::<Persisted>(back).unwrap(), p);
    }

    #[test]
    fn a_damaged_state_file_is_kept_aside_and_updates_go_on() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        std::fs::create_dir_all(store.path().parent().unwrap()).unwrap();
        std::fs::write(store.path(), b"{\"last_serial\": {\"stable\": 7").unwrap();
        let p = store.load().unwrap();
        let reset = p.reports.state_reset.clone().unwrap();
        assert!(reset.reason.contains("EOF"), "{reset:?}");
        assert_eq!(
            std::fs::read(&reset.kept_as).unwrap(),
            b"{\"last_serial\": {\"stable\": 7"
        );
        assert!(p.channel.last_serial.is_empty());
        // The fresh file is valid and says what happened.
        assert_eq!(store.load().unwrap(), p);
    }
}
