//! The update engine: a small loop over owners. The channel reader
//! (`channel`) verifies manifests and chooses; the installer (`install`)
//! writes the passive slot and flips; the reboot coordinator (`reboot`)
//! decides when to reboot; the trust keeper (`trust`) learns key rotations
//! and gives them to stage 1; the stage-1 keeper (`stage1`) keeps stage 1's
//! copies on the ESP. Each owns its part of the state file
//! ([`crate::state::Persisted`]) and changes only that; the loop here
//! sequences them, reports events, and keeps the status.

use std::path::Path;

use nimbus::gpt::GptError;
use nimbus::layout::Slot;
use nimbus::release::{Manifest, SlotDescriptor};
use nimbus::slots;
use semver::Version;

use crate::choose::Choice;
use crate::config::EngineConfig;
use crate::error::UpdateError;
use crate::fetch::{Http, Transport};
use crate::state::{ChannelState, Ledger, Reports};
use crate::status::{ErrorReport, State};

mod channel;
mod ctx;
mod host;
mod install;
mod lock;
mod metered;
mod reboot;
mod rollback;
mod shared;
mod slot_view;
mod stage1;
mod trust;

pub use channel::write_group;
pub use ctx::Ctx;
pub use host::{FileStorage, Host, Storage};
pub use install::Installer;
pub use lock::RebootLock;
pub use reboot::{machine_id, Coordinator};
pub use shared::{Clock, Options, Shared, SystemClock};
pub use slot_view::SlotView;
pub use trust::{TrustKeeper, TrustView};

pub struct Engine {
    ctx: Ctx,
    ledger: Ledger,
    trust: TrustKeeper,
    reboot: Coordinator,
}

pub struct CheckResult {
    pub manifest: Manifest,
    pub choice: Choice,
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
        let http: Box<dyn Transport> = Box::new(metered::Metered {
            inner: http,
            shared: shared.clone(),
        });
        let mut trust = TrustKeeper::load(&host)?;
        let mut ledger = Ledger::open(&host.root)?;
        channel::ensure_seed(&mut ledger)?;
        let running = trust.settle_booted(&host)?;
        let ctx = Ctx {
            host,
            cfg,
            http,
            clock,
            shared,
            running,
        };
        trust.publish(&ctx.host, &ctx.shared);
        let mut e = Engine {
            ctx,
            ledger,
            trust,
            reboot: Coordinator::default(),
        };
        if let Err(err) = rollback::detect(&e.ctx, e.trust.view(), &mut e.ledger) {
            tracing::warn!("checking for a rollback: {err}");
        }
        let good = e.ctx.booted_is_good(e.trust.view());
        if let Err(err) = stage1::detect_fallback(&e.ctx, &mut e.ledger, good) {
            tracing::warn!("checking stage 1 on the ESP: {err}");
        }
        e.refresh();
        e.trust.sync_to_esp(&e.ctx.host, &e.ctx.shared, good);
        Ok(e)
    }

    pub fn host(&self) -> &Host {
        &self.ctx.host
    }

    pub fn shared(&self) -> &std::sync::Arc<Shared> {
        &self.ctx.shared
    }

    pub fn running(&self) -> &Version {
        &self.ctx.running
    }

    pub fn store_path(&self) -> &Path {
        self.ledger.path()
    }

    /// The slots now: one GPT read (`SlotView`).
    pub fn slots(&self) -> Result<SlotView, UpdateError> {
        self.ctx.slots(self.trust.view())
    }

    /// Re-read config, slots and versions into the status.
    pub fn refresh(&mut self) {
        if let Ok(c) = EngineConfig::load(&self.ctx.host.root) {
            self.ctx.cfg = c;
        }
        let view = self.slots().ok();
        let infos = view.as_ref().map(SlotView::infos).unwrap_or_default();
        let staged = view.as_ref().and_then(SlotView::staged);
        let ctx = &self.ctx;
        let p = self.ledger.get();
        let stage1 = crate::status::Stage1Status {
            running_copy: (!ctx.host.host_mode)
                .then(|| stage1::running_copy(ctx))
                .flatten(),
            pending: p.stage1.stage1_pending.clone(),
            failed: p.stage1.stage1_failed.clone(),
            unblessed: (!ctx.host.host_mode)
                .then(|| nimbus::esp::BlessFailure::read(&ctx.host.root))
                .flatten(),
        };
        ctx.shared.update(|s| {
            s.rollback = p.reports.rollback.clone();
            s.state_reset = p.reports.state_reset.clone();
            s.stage1 = Some(stage1);
            s.channel = ctx.cfg.group.clone();
            s.server = ctx.cfg.server.clone().unwrap_or_else(|| "disabled".into());
            s.reboot_strategy = ctx.cfg.strategy.to_string();
            s.running_version = ctx.running.to_string();
            s.booted_slot = Slot::from_partition_number(ctx.host.booted)
                .map_or_else(String::new, |s| s.label().to_string());
            s.slots = infos;
            if let Some(v) = &staged {
                s.state = State::UpdatedNeedReboot;
                s.new_version = Some(v.to_string());
            }
        });
    }

    pub fn report_error(&self, e: &UpdateError) {
        tracing::error!(kind = e.kind(), "{e}");
        self.ctx.shared.metric(|m| m.failure(e.kind()));
        let at = self.ctx.clock.now();
        self.ctx.shared.update(|s| {
            s.state = State::ReportingErrorEvent;
            s.progress = None;
            s.last_error = Some(ErrorReport {
                kind: e.kind().to_string(),
                message: e.to_string(),
                at,
            });
        });
    }

    /// Fetch and verify the channel, decide. Changes nothing on disk but the
    /// accepted serial (and trust rotations learned on the way).
    pub fn check(&mut self) -> Result<CheckResult, UpdateError> {
        let r = self.check_inner();
        self.ctx.shared.metric(|m| m.check(r.is_ok()));
        r
    }

    fn check_inner(&mut self) -> Result<CheckResult, UpdateError> {
        self.refresh();
        self.ctx.shared.update(|s| {
            s.state = State::CheckingForUpdate;
            s.last_error = None;
            s.note = None;
        });
        let group = self.ctx.cfg.group.clone();
        let manifest =
            channel::fetch_manifest(&self.ctx, &mut self.trust, &mut self.ledger, &group)?;
        let mut choice = channel::choose(&self.ctx, &self.ledger, &manifest);
        if let (Choice::Offer(r), Err(why)) = (&choice, self.ctx.ensure_proven(self.trust.view())) {
            choice = Choice::Nothing(format!("{} is available; {why}", r.version));
        }
        let staged = self.slots().ok().and_then(|v| v.staged());
        if let (Choice::Offer(r), Some(v)) = (&choice, &staged) {
            if r.version == *v {
                choice = Choice::Nothing(format!("{v} is already staged for the next boot"));
            }
        }
        let (state, note, newv) = match (&choice, &staged) {
            (Choice::Offer(r), _) => (State::UpdateAvailable, None, Some(r.version.to_string())),
            (Choice::Nothing(why) | Choice::Wait { reason: why, .. }, Some(v)) => (
                State::UpdatedNeedReboot,
                Some(why.clone()),
                Some(v.to_string()),
            ),
            (Choice::Nothing(why) | Choice::Wait { reason: why, .. }, None) => {
                (State::Idle, Some(why.clone()), None)
            }
        };
        let now = self.ctx.clock.now();
        self.ctx.shared.update(|s| {
            s.state = state;
            s.note = note;
            s.new_version = newv;
            s.last_check = Some(now);
        });
        Ok(CheckResult { manifest, choice })
    }

    /// Check and, if something is offered, install it. Returns the version
    /// staged, if any.
    pub fn update(&mut self) -> Result<Option<Version>, UpdateError> {
        match self.check()?.choice {
            Choice::Offer(r) => {
                let url = format!("{}/{}", self.ctx.server()?, r.payload);
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
        let m = channel::read_manifest(
            &self.ctx,
            &self.trust,
            &mut self.ledger,
            manifest,
            signatures,
        )?;
        match channel::choose(&self.ctx, &self.ledger, &m) {
            Choice::Offer(r) => {
                self.install(&r, &payload.display().to_string(), Some(payload))?;
                Ok(r.version)
            }
            Choice::Nothing(why) | Choice::Wait { reason: why, .. } => {
                Err(UpdateError::Refused(why))
            }
        }
    }

    /// The installer, with the stage-1 keeper before the flip; then the
    /// events it ends (a rollback report, a reset, a downgrade allowance).
    fn install(
        &mut self,
        r: &nimbus::release::Release,
        url: &str,
        file: Option<&Path>,
    ) -> Result<(), UpdateError> {
        let ctx = &self.ctx;
        Installer {
            ctx,
            trust: self.trust.view(),
            ledger: &mut self.ledger,
        }
        .install(r, url, file, &mut |ledger| match (file, &r.stage1) {
            (None, Some(s1)) => stage1::install(ctx, ledger, r, s1),
            _ => Ok(()),
        })?;
        if let Some(rep) = self.ctx.shared.snapshot().last_apply {
            self.ctx.shared.metric(|m| m.installed(&rep));
        }
        self.ledger
            .edit(|s: &mut Reports| *s = Reports::default())?;
        let group = self.ctx.cfg.group.clone();
        self.ledger.edit(|s: &mut ChannelState| {
            if s.allow_downgrade.as_deref() == Some(group.as_str()) {
                s.allow_downgrade = None;
            }
        })?;
        self.refresh();
        let off = self.ctx.cfg.strategy == crate::policy::Strategy::Off;
        self.ctx.shared.update(|s| {
            s.state = State::UpdatedNeedReboot;
            s.progress = None;
            s.note = Some(if off {
                "reboot to use the new version (REBOOT_STRATEGY=off: not rebooting by itself)"
                    .into()
            } else {
                "reboot to use the new version".into()
            });
        });
        Ok(())
    }

    /// One step of reboot coordination (`Coordinator::step`), after the
    /// stage-1 bless and the trust sync each get their retry.
    pub fn reboot_step(&mut self) -> Result<crate::policy::Decision, UpdateError> {
        let good = self.ctx.booted_is_good(self.trust.view());
        stage1::retry_recorded_bless(&self.ctx, good);
        self.refresh();
        self.trust
            .sync_to_esp(&self.ctx.host, &self.ctx.shared, good);
        let view = self.slots()?;
        self.reboot.step(&self.ctx, &mut self.ledger, &view)
    }

    pub fn set_channel(
        &mut self,
        name: &str,
        allow_downgrade: bool,
    ) -> Result<String, UpdateError> {
        let msg = channel::switch(
            &self.ctx,
            &mut self.trust,
            &mut self.ledger,
            name,
            allow_downgrade,
        )?;
        self.refresh();
        Ok(msg)
    }

    pub fn rollback(&mut self) -> Result<String, UpdateError> {
        let host = &self.ctx.host;
        let mut disk = host.storage.gpt(true)?;
        // A slot signed by keys since removed would only be refused by
        // stage 1 at the next boot: say so now, and change nothing.
        let target = slots::rollback_target(&disk.slot_table(), host.booted).map_err(|source| {
            UpdateError::Gpt(GptError::Slot {
                path: host.disk.clone(),
                source,
            })
        })?;
        if let Some(slot) = Slot::from_partition_number(target) {
            let b = disk.read_descriptor(slot)?;
            let newest = self.trust.view().newest();
            if let Err(e) = SlotDescriptor::verify(&b, newest) {
                return Err(UpdateError::Refused(format!(
                    "not rolling back: {slot} has no valid descriptor under trust set version {} ({e})",
                    newest.version
                )));
            }
        }
        let target = disk.update_slots(|t| slots::rollback(t, host.booted))?;
        self.refresh();
        Ok(format!("partition {target} boots next"))
    }

    /// D-Bus `ResetStatus`, as Flatcar's: from an error back to idle; from
    /// a staged update, undo it (the staged slot made unbootable, so the
    /// booted one stays first and no reboot is wanted). A later check may
    /// offer and install the same version again.
    pub fn reset_status(&mut self) -> Result<String, UpdateError> {
        let view = self.slots()?;
        let msg = match view.staged() {
            Some(v) => {
                let passive = view.passive()?;
                let mut disk = self.ctx.host.storage.gpt(true)?;
                disk.update_slots(|t| slots::invalidate(t, passive))?;
                let flag = self.ctx.host.root.join(nimbus::paths::REBOOT_REQUIRED);
                if let Err(e) = std::fs::remove_file(&flag) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("{}: {e}", flag.display());
                    }
                }
                format!("{v} unstaged: partition {passive} will not boot")
            }
            None => "idle".to_string(),
        };
        self.ctx.shared.update(|s| {
            s.state = State::Idle;
            s.progress = None;
            s.new_version = None;
        });
        self.refresh();
        tracing::info!("reset: {msg}");
        Ok(msg)
    }

    pub fn mark_good(&mut self) -> Result<String, UpdateError> {
        let booted = self.ctx.host.booted;
        let mut disk = self.ctx.host.storage.gpt(true)?;
        disk.update_slots(|t| slots::mark_good(t, booted))?;
        self.refresh();
        Ok(format!("partition {booted} marked good"))
    }
}

#[cfg(test)]
mod unit;
