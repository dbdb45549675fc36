//! The reboot coordinator: when a staged slot may be booted (strategy,
//! window, the etcd semaphore), the pre-reboot and post-good hooks with
//! their retry, and the lock's release once the new slot is good. Its
//! state is [`RebootState`] on disk and the hooks' retry time in memory.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{io_at, UpdateError};
use crate::metrics::WaitReason;
use crate::policy::{decide, Decision, Lock, Strategy};
use crate::state::{Ledger, RebootState};

use super::{Ctx, SlotView};

/// This host's name in the reboot semaphore: /etc/machine-id under `root`.
pub fn machine_id(root: &Path) -> Result<String, UpdateError> {
    let p = root.join("etc/machine-id");
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

#[derive(Debug, Default)]
pub struct Coordinator {
    /// No reboot before this: a pre-reboot hook failed.
    hooks_retry_at: Option<Instant>,
    /// The last step left a staged update waiting: since when, and why
    /// (the time until the next step is counted under that reason).
    waiting: Option<(Instant, WaitReason)>,
    /// Why this step waits, set where the step decides.
    wait_reason: Option<WaitReason>,
    /// FleetLock's steady state was reported since update-engine started.
    steady_reported: bool,
    /// FleetLock: failed asks in a row, and no new ask before this.
    lock_failures: u32,
    lock_retry_at: Option<Instant>,
}

/// FleetLock asks back off after failures: 2 s, 4 s, ... up to a minute
/// (Zincati retries; a fleet must not hammer a struggling server).
fn lock_backoff(failures: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(failures.min(6)).min(60))
}

/// A FleetLock "taken" (409) is asked again after this, not backed off
/// from: it is the normal answer while another host reboots, and a minute
/// of backoff after each would add up to minutes per host in a rolling
/// update. One cheap request per host every 10 s is no load on the server.
const LOCK_TAKEN_RETRY: Duration = Duration::from_secs(10);

impl Coordinator {
    /// One step of reboot coordination (`step_inner`), with the time a
    /// staged update spent waiting since the last step counted by reason.
    pub fn step(
        &mut self,
        ctx: &Ctx,
        ledger: &mut Ledger,
        view: &SlotView,
    ) -> Result<Decision, UpdateError> {
        self.wait_reason = None;
        let d = self.step_inner(ctx, ledger, view);
        if let Some((since, why)) = self.waiting.take() {
            let secs = since.elapsed().as_secs_f64();
            ctx.shared.metric(|m| m.waited(why, secs));
        }
        if let (Ok(Decision::Wait { .. }), true) = (&d, view.staged().is_some()) {
            self.waiting = Some((
                Instant::now(),
                self.wait_reason.unwrap_or(WaitReason::Other),
            ));
        }
        d
    }

    /// One step of reboot coordination over the slots as they are now:
    /// give back a lock held from before a reboot once this boot is good,
    /// then judge strategy, window and lock for a staged update. Returns
    /// what to do; the note in the status says why when the answer is to
    /// wait.
    fn step_inner(
        &mut self,
        ctx: &Ctx,
        ledger: &mut Ledger,
        view: &SlotView,
    ) -> Result<Decision, UpdateError> {
        let staged = view.staged();
        let is_staged = staged.is_some();
        // A pre-reboot hook failed and so did its undo (post_good_pending
        // still set): the undo is tried again before anything else, so a
        // drained host never keeps the lock through its retries.
        let undo_failed = is_staged && self.hooks_retry_at.is_some();
        if (!is_staged && view.booted_is_good()) || undo_failed {
            // Reactivate first (a drained host rejoins), then give the
            // lock back: the next host may drain only once this one serves.
            if let Some(v) = ledger.get().reboot.post_good_pending.clone() {
                let rolled_back = !undo_failed && v != ctx.running.to_string();
                match run_hooks(ctx, crate::hooks::Kind::PostGood, &v, rolled_back) {
                    Ok(()) => ledger.edit(|s: &mut RebootState| s.post_good_pending = None)?,
                    Err(e) => {
                        let why = format!("{e}; the reboot lock is kept until the post-good hooks succeed (retried every step)");
                        tracing::warn!("{why}");
                        ctx.shared.update(|s| s.note = Some(why.clone()));
                        return Ok(Decision::Wait { until: None, why });
                    }
                }
            }
            release_lock_if_taken(ctx, ledger);
            // FleetLock's rule: a client reports steady state when it
            // starts, before anything else, so a slot a host took before
            // it lost its state file is not held forever.
            if !undo_failed
                && !self.steady_reported
                && ctx.cfg.strategy == Strategy::FleetLock
                && ledger.get().reboot.lock_taken.is_none()
            {
                match super::lock::for_strategy(ctx)?.map(|rl| rl.release()) {
                    Some(Ok(_)) | None => self.steady_reported = true,
                    Some(Err(e)) => {
                        tracing::warn!("FleetLock steady-state: {e} (retried every step)");
                    }
                }
            }
        }
        if is_staged && ctx.cfg.strategy == Strategy::Off {
            touch_reboot_required(ctx, staged.as_ref());
        }
        // After a failed pre-reboot hook, not even the lock is taken again
        // before the retry time: another host may go first meanwhile.
        if let Some(at) = self.hooks_retry_at.filter(|_| is_staged) {
            let left = at.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                self.wait_reason = Some(WaitReason::Hook);
                let why = format!(
                    "a pre-reboot hook failed; the reboot is tried again in {} s",
                    left.as_secs()
                );
                return Ok(Decision::Wait { until: None, why });
            }
        }
        let now = chrono::Local::now().naive_local();
        let strategy = ctx.cfg.strategy;
        let window = ctx.cfg.window;
        let mut lock = Lock::NotAsked;
        let rl = super::lock::for_strategy(ctx)?;
        if let (true, Some(rl), true) = (is_staged, &rl, window.is_none_or(|w| w.contains(now))) {
            lock = rl.status();
        }
        let mut d = decide(is_staged, strategy, window.as_ref(), &lock, now);
        if let (Decision::TakeLock, Some(at)) = (&d, self.lock_retry_at) {
            let left = at.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                self.wait_reason = Some(WaitReason::Lock);
                return Ok(Decision::Wait {
                    until: None,
                    why: if self.lock_failures == 0 {
                        // Only a "taken" sets a retry without a failure.
                        format!(
                            "the reboot lock is taken by other hosts; asking again in {} s",
                            left.as_secs().max(1)
                        )
                    } else {
                        format!(
                            "the reboot lock was not granted {} time(s) in a row; asking again in {} s",
                            self.lock_failures,
                            left.as_secs().max(1)
                        )
                    },
                });
            }
        }
        if let (Decision::TakeLock, Some(rl)) = (&d, &rl) {
            // Persist the intent first: a crash right after the take must
            // still lead to a release on the next boot.
            let key = rl.key();
            ledger.edit(|s: &mut RebootState| s.lock_taken = Some(key.clone()))?;
            lock = rl.acquire();
            if lock == Lock::Held {
                tracing::info!("reboot lock {key}: taken by {}", rl.id());
            }
            // Only a definite "no" clears the intent; after an error the
            // take may have gone through, and a release of a slot never
            // held is harmless, so the intent stays.
            if matches!(lock, Lock::Full { .. } | Lock::Refused(_) | Lock::Taken(_)) {
                ledger.edit(|s: &mut RebootState| s.lock_taken = None)?;
            }
            if strategy == Strategy::FleetLock && matches!(lock, Lock::Taken(_)) {
                self.lock_failures = 0;
                self.lock_retry_at = Instant::now().checked_add(LOCK_TAKEN_RETRY);
            } else if strategy == Strategy::FleetLock && lock != Lock::Held {
                self.lock_failures = self.lock_failures.saturating_add(1);
                self.lock_retry_at = Instant::now().checked_add(lock_backoff(self.lock_failures));
            } else {
                self.lock_failures = 0;
                self.lock_retry_at = None;
            }
            d = decide(is_staged, strategy, window.as_ref(), &lock, now);
        }
        if d == Decision::Reboot {
            d = self.before_reboot(ctx, ledger, staged.map(|v| v.to_string()));
        }
        if self.wait_reason.is_none() && matches!(d, Decision::Wait { .. }) {
            self.wait_reason = Some(if window.is_some_and(|w| !w.contains(now)) {
                WaitReason::Window
            } else if matches!(
                lock,
                Lock::Full { .. } | Lock::Unavailable(_) | Lock::Refused(_) | Lock::Taken(_)
            ) {
                WaitReason::Lock
            } else {
                WaitReason::Other
            });
        }
        if let Decision::Wait { why, .. } = &d {
            let why = why.clone();
            ctx.shared.update(|s| s.note = Some(why));
        }
        Ok(d)
    }

    /// The reboot is decided: run the pre-reboot hooks. If one fails, undo
    /// with the post-good hooks, give the lock back, and try again later.
    fn before_reboot(
        &mut self,
        ctx: &Ctx,
        ledger: &mut Ledger,
        staged: Option<String>,
    ) -> Decision {
        let version = staged.unwrap_or_default();
        // Recorded before the first hook starts: whatever happens from here
        // (a crash, a power cut, the reboot itself), the post-good hooks run
        // before the lock is given back.
        if let Err(e) =
            ledger.edit(|s: &mut RebootState| s.post_good_pending = Some(version.clone()))
        {
            return Decision::Wait {
                until: None,
                why: format!("not rebooting: cannot record the pre-reboot step: {e}"),
            };
        }
        let e = match run_hooks(ctx, crate::hooks::Kind::PreReboot, &version, false) {
            Ok(()) => {
                ctx.shared.update(|s| s.hook_failure = None);
                self.hooks_retry_at = None;
                return Decision::Reboot;
            }
            Err(e) => e,
        };
        self.wait_reason = Some(WaitReason::Hook);
        tracing::warn!("{e}");
        // Another HOOK_TIMEOUT: what blocked the hook (a task with nowhere to
        // go) may clear meanwhile, and other hosts may take their turn.
        // Checked: HOOK_TIMEOUT is capped at a day when parsed, but an
        // Instant that cannot hold the sum must not panic the engine here,
        // with the host drained and the lock held.
        let now = Instant::now();
        self.hooks_retry_at = Some(now.checked_add(ctx.cfg.hook_timeout).unwrap_or(now));
        let undo = match run_hooks(ctx, crate::hooks::Kind::PostGood, &version, false) {
            Ok(()) => {
                if let Err(e) = ledger.edit(|s: &mut RebootState| s.post_good_pending = None) {
                    tracing::warn!("state file: {e}");
                }
                release_lock_if_taken(ctx, ledger);
                if ledger.get().reboot.lock_taken.is_none() {
                    "post-good hooks ran to undo it; the reboot lock is not held".to_string()
                } else {
                    "post-good hooks ran to undo it; the reboot lock could not be released yet (retried)".to_string()
                }
            }
            Err(u) => format!("undoing it failed too ({u}); the reboot lock is kept"),
        };
        let why = format!(
            "not rebooting: {e}; {undo}; tried again in {} s",
            ctx.cfg.hook_timeout.as_secs()
        );
        // The note is overwritten by the next check; this stays.
        ctx.shared.update(|s| s.hook_failure = Some(why.clone()));
        Decision::Wait { until: None, why }
    }
}

/// Give back a reboot lock this host took, if it holds one; an error is
/// kept in the state file and retried on the next step, never lost.
fn release_lock_if_taken(ctx: &Ctx, ledger: &mut Ledger) {
    let Some(key) = ledger.get().reboot.lock_taken.clone() else {
        return;
    };
    let rl = match super::lock::for_strategy(ctx) {
        Ok(Some(rl)) => rl,
        // The strategy changed since the lock was taken: the lock it took
        // is the one to give back (an etcd key; a FleetLock server is only
        // known while configured).
        Ok(None) => match super::lock::etcd(ctx) {
            Ok(rl) => rl,
            Err(e) => {
                tracing::warn!("reboot lock {key}: cannot release yet: {e}");
                return;
            }
        },
        Err(e) => {
            tracing::warn!("reboot lock {key}: cannot release yet: {e}");
            return;
        }
    };
    match rl.release() {
        Ok(held) => {
            tracing::info!("reboot lock {key}: released by {} (held: {held})", rl.id());
            if let Err(e) = ledger.edit(|s: &mut RebootState| s.lock_taken = None) {
                tracing::warn!("reboot lock {key}: released, but the state file: {e}");
            }
        }
        Err(e) => {
            tracing::warn!("reboot lock {key}: cannot release yet: {e}");
            ctx.shared
                .update(|s| s.note = Some(format!("cannot release the reboot lock yet: {e}")));
        }
    }
}

/// REBOOT_STRATEGY=off: say on the host that a reboot is wanted, for
/// kured-style tools (and a login banner) to act on.
fn touch_reboot_required(ctx: &Ctx, staged: Option<&semver::Version>) {
    let p = ctx.root().join(nimbus::paths::REBOOT_REQUIRED);
    if p.exists() {
        return;
    }
    let text = match staged {
        Some(v) => format!("*** System restart required: Nimbus {v} is staged ***\n"),
        None => "*** System restart required ***\n".to_string(),
    };
    // /run is root's; an existing file is left as it is.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
    {
        Ok(()) => tracing::info!("{}: a reboot is needed (REBOOT_STRATEGY=off)", p.display()),
        Err(e) => tracing::warn!("{}: {e}", p.display()),
    }
}

/// Run every hook of `kind`, showing which one runs in the status.
fn run_hooks(
    ctx: &Ctx,
    kind: crate::hooks::Kind,
    version: &str,
    rolled_back: bool,
) -> Result<(), crate::hooks::HookError> {
    let env = [
        ("NIMBUS_NEW_VERSION", version.to_string()),
        ("NIMBUS_RUNNING_VERSION", ctx.running.to_string()),
        (
            "NIMBUS_ROLLED_BACK",
            if rolled_back { "1" } else { "0" }.to_string(),
        ),
        ("NIMBUS_ROOT", ctx.root().display().to_string()),
    ];
    let shared = ctx.shared.clone();
    // (Not `now - 10 s`: the monotonic clock starts at boot, and an
    // Instant before it panics.)
    let mut last_shown: Option<Instant> = None;
    let mut progress = |run: &crate::hooks::Running<'_>| {
        // Once a second is plenty for `updatectl status`.
        if last_shown.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_shown = Some(Instant::now());
            let line = run.to_string();
            shared.update(|s| {
                s.note = Some(format!("waiting on the {line}"));
                s.hook = Some(line);
            });
        }
    };
    // `hooks::run_all`'s loop, with each hook's outcome counted.
    let r = crate::hooks::discover(ctx.root(), kind).and_then(|hooks| {
        for h in &hooks {
            tracing::info!("{kind} hook {}: running {}", h.name, h.path.display());
            let r = crate::hooks::run(kind, h, &env, ctx.cfg.hook_timeout, &mut progress);
            ctx.shared
                .metric(|m| m.hook(kind.name(), &h.name, r.is_ok()));
            r?;
            tracing::info!("{kind} hook {}: done", h.name);
        }
        Ok(hooks.len())
    });
    ctx.shared.update(|s| s.hook = None);
    r.map(|n| {
        if n > 0 {
            tracing::info!("{kind} hooks: {n} done");
        }
    })
}
