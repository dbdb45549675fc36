//! What update-engine keeps across restarts and power cuts, in
//! `/var/lib/nimbus/update-engine.json`, always replaced whole with
//! write-new, fsync, rename, fsync-dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::UpdateError;
use crate::sha::SavedState;

pub const STATE_PATH: &str = nimbus::paths::ENGINE_STATE;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
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
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// How far a delta install got: its first `blocks` data blocks are
    /// written and synced (valid while the slot stays invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_checkpoint: Option<DeltaCheckpoint>,
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
    /// The last automatic rollback, reported until a newer version is
    /// installed.
    #[serde(default)]
    pub rollback: Option<crate::status::Rollback>,
    /// Versions that failed on this host; never offered again (a newer
    /// release is). Newest last, at most [`MAX_FAILED_VERSIONS`].
    #[serde(default)]
    pub failed_versions: Vec<semver::Version>,
    /// The state file was damaged and put aside; reported by `updatectl
    /// status` until the next install.
    #[serde(default)]
    pub state_reset: Option<StateReset>,
    /// A stage 1 installed into the ESP's other copy and not yet seen to
    /// boot (blessed by mark-good, or given up by the loader).
    #[serde(default)]
    pub stage1_pending: Option<Stage1Install>,
    /// The last stage 1 that did not come up; reported until the next one
    /// boots, and never installed again (by its hashes).
    #[serde(default)]
    pub stage1_failed: Option<Stage1Failure>,
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

/// A damaged state file, kept aside so updates go on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateReset {
    /// Where the damaged file was kept.
    pub kept_as: String,
    pub reason: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

pub const MAX_FAILED_VERSIONS: usize = 16;

impl Persisted {
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

/// The persisted state while an install runs: its threads record
/// checkpoints, each saved at once; the caller takes the state back after
/// the attempt, failed or not, so the next attempt resumes from it.
pub struct Saver<'a> {
    store: &'a Store,
    state: std::sync::Mutex<Persisted>,
}

impl<'a> Saver<'a> {
    pub fn new(store: &'a Store, state: Persisted) -> Saver<'a> {
        Saver {
            store,
            state: std::sync::Mutex::new(state),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Persisted)) -> Result<(), UpdateError> {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
        self.store.save(&p)
    }

    pub fn into_inner(self) -> Persisted {
        self.state.into_inner().unwrap_or_else(|e| e.into_inner())
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
            state_reset: Some(StateReset {
                kept_as: kept.display().to_string(),
                reason: reason.to_string(),
                at: now,
            }),
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
    fn a_damaged_state_file_is_kept_aside_and_updates_go_on() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        std::fs::create_dir_all(store.path().parent().unwrap()).unwrap();
        std::fs::write(store.path(), b"{\"last_serial\": {\"stable\": 7").unwrap();
        let p = store.load().unwrap();
        let reset = p.state_reset.clone().unwrap();
        assert!(reset.reason.contains("EOF"), "{reset:?}");
        assert_eq!(
            std::fs::read(&reset.kept_as).unwrap(),
            b"{\"last_serial\": {\"stable\": 7"
        );
        assert!(p.last_serial.is_empty());
        // The fresh file is valid and says what happened.
        assert_eq!(store.load().unwrap(), p);
    }
}
