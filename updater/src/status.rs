//! The engine's state as clients see it: Flatcar's state names, progress,
//! versions and the last error with its reason.

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Idle,
    CheckingForUpdate,
    UpdateAvailable,
    Downloading,
    Verifying,
    Finalizing,
    UpdatedNeedReboot,
    ReportingErrorEvent,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Compressed bytes received (the download).
    pub done: u64,
    pub total: u64,
    /// Bytes per second over the last second or so.
    pub rate: u64,
    /// Where this attempt started (a resumed download starts above zero).
    pub resumed_from: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorReport {
    pub kind: String,
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlotInfo {
    pub label: String,
    pub partition: u32,
    pub priority: u8,
    pub tries: u8,
    pub successful: bool,
    pub version: Option<String>,
    pub booted: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub state: State,
    pub channel: String,
    pub server: String,
    pub running_version: String,
    pub booted_slot: String,
    /// The version being installed or staged for the next boot.
    pub new_version: Option<String>,
    pub progress: Option<Progress>,
    pub last_check: Option<DateTime<Utc>>,
    pub last_error: Option<ErrorReport>,
    pub reboot_strategy: String,
    /// Plain words on what happens next (why nothing is offered, why a
    /// reboot waits).
    pub note: Option<String>,
    pub slots: Vec<SlotInfo>,
    /// How the last install went: bytes, time, and the I/O limit in force.
    #[serde(default)]
    pub last_apply: Option<ApplyReport>,
    /// The last automatic rollback: which version was given up and why.
    #[serde(default)]
    pub rollback: Option<Rollback>,
    /// The state file was found damaged and started over.
    #[serde(default)]
    pub state_reset: Option<crate::state::StateReset>,
    /// The trust sets of update-engine and stage 1 (`updatectl trust`).
    #[serde(default)]
    pub trust: Option<TrustStatus>,
    /// Stage 1 on the ESP: the copy running, one on trial, the last one
    /// that did not come up.
    #[serde(default)]
    pub stage1: Option<Stage1Status>,
    /// The update hook running now: which, for how long, its last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// The last pre-reboot hook that stopped a reboot, and what was done
    /// about it; kept until a reboot's hooks succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stage1Status {
    /// From `nimbus.stage1=` (`None` in host mode or on a loader that does
    /// not say).
    pub running_copy: Option<nimbus::esp::Copy>,
    /// Installed into the other copy, waiting for its first good boot.
    pub pending: Option<crate::state::Stage1Install>,
    /// The last new stage 1 that did not boot: the loader went back.
    pub failed: Option<crate::state::Stage1Failure>,
    /// The running copy booted a slot marked good but could not be made
    /// the loaders' default (mark-good's record; retried by update-engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unblessed: Option<nimbus::esp::BlessFailure>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrustSetInfo {
    pub version: u64,
    pub threshold: usize,
    pub keys: Vec<String>,
}

impl TrustSetInfo {
    pub fn of(t: &nimbus::keys::TrustStore) -> TrustSetInfo {
        TrustSetInfo {
            version: t.version,
            threshold: t.threshold,
            keys: t.keys.keys().map(|k| k.to_string()).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrustStatus {
    /// What update-engine checks manifests and new slots against: the
    /// newest set it learned.
    pub usr: TrustSetInfo,
    /// The set built into the running USR.
    pub usr_builtin_version: u64,
    /// The newest set the booted slot is valid under: what stage 1 is
    /// given once the booted slot is good.
    pub active_version: u64,
    /// The newest rotation on the ESP (unknown until first looked at).
    pub esp_version: Option<u64>,
    /// What stage 1 booted with (from the kernel command line).
    pub stage1: Option<nimbus::trust::Stage1Trust>,
    /// A stored rotation that did not verify, if any.
    pub chain_error: Option<String>,
}

pub use crate::state::Rollback;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    pub version: String,
    pub written: u64,
    pub downloaded: u64,
    pub resumed_from: u64,
    pub seconds: f64,
    pub io_limit: String,
    pub direct_io: bool,
    /// "delta" or "full".
    #[serde(default)]
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaReport>,
    /// Why a delta was not used (too large, the server ignored Range, a bad
    /// frame...): the full payload was applied instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_fallback: Option<String>,
}

/// Where a delta update's blocks came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeltaReport {
    pub blocks: u64,
    pub from_booted: u64,
    pub from_passive: u64,
    pub fetched_frames: u64,
    /// Pack bytes fetched (frames and small gaps), and the index.
    pub fetched_bytes: u64,
    pub index_bytes: u64,
    pub requests: u64,
    /// Of the full payload's compressed size.
    pub percent_of_full: f64,
    /// How the booted slot's blocks were found ("its verity tree" or
    /// "hashing its data").
    pub booted_hashes: String,
}

impl Status {
    pub fn new() -> Status {
        Status {
            state: State::Idle,
            channel: String::new(),
            server: String::new(),
            running_version: String::new(),
            booted_slot: String::new(),
            new_version: None,
            progress: None,
            last_check: None,
            last_error: None,
            reboot_strategy: String::new(),
            note: None,
            slots: Vec::new(),
            last_apply: None,
            rollback: None,
            state_reset: None,
            trust: None,
            stage1: None,
            hook: None,
            hook_failure: None,
        }
    }
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}
