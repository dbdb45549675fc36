//! The stage-1 keeper: stage 1's two copies on the ESP. It installs a
//! release's stage 1 into the copy not running, notices a trial the loader
//! gave up, and blesses the running copy once its slot is good. Its state
//! is [`Stage1State`]; it never touches the slots or the trust chain.

use nimbus::release::Release;

use super::Ctx;
use crate::error::UpdateError;
use crate::state::{Ledger, Stage1Failure, Stage1Install, Stage1State};

/// Install the release's stage 1 into the ESP's other copy, unless the
/// running copy already is it, or it failed to boot here before.
pub fn install(
    ctx: &Ctx,
    ledger: &mut Ledger,
    r: &Release,
    s1: &nimbus::release::Stage1Files,
) -> Result<(), UpdateError> {
    use sha2::Digest;
    let Some(running) = running_copy(ctx) else {
        tracing::info!("stage 1: the loader did not say which copy runs; not updating it");
        return Ok(());
    };
    let (ks, is) = (&s1.kernel.sha256, &s1.initramfs.sha256);
    if ledger.get().stage1.stage1_failed.as_ref().is_some_and(|f| {
        f.blocked && &f.install.kernel_sha256 == ks && &f.install.initramfs_sha256 == is
    }) {
        tracing::warn!(
            "stage 1 of {}: it did not boot here before; not installed again",
            r.version
        );
        return Ok(());
    }
    let mut same = false;
    ctx.host
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
        .map_err(|e| ctx.esp_err(e))?;
    if same {
        return Ok(());
    }
    let kernel = ctx.fetch_file(&s1.kernel)?;
    let initramfs = ctx.fetch_file(&s1.initramfs)?;
    let label = r.version.to_string();
    let mut done = None;
    ctx.host
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
        .map_err(|e| ctx.esp_err(e))?;
    if let Some((copy, generation)) = done {
        tracing::info!(
            "stage 1 of {label} installed into ESP copy {copy} (generation {generation}); \
             the next boot tries it once, copy {running} stays the fallback"
        );
        ledger.edit(|s: &mut Stage1State| {
            s.stage1_pending = Some(Stage1Install {
                version: label,
                copy,
                generation,
                kernel_sha256: ks.clone(),
                initramfs_sha256: is.clone(),
                booted: false,
            })
        })?;
    }
    Ok(())
}

/// After a boot: a stage 1 on trial that the loader gave up (it never
/// came up to mark-good) is reported, cleared from the loaders, and
/// never installed again; one that booted is done.
pub fn detect_fallback(
    ctx: &Ctx,
    ledger: &mut Ledger,
    booted_good: bool,
) -> Result<(), UpdateError> {
    let Some(running) = running_copy(ctx) else {
        return Ok(());
    };
    let mut failed = None;
    ctx.host
        .esp
        .with(true, &mut |fs| {
            failed = nimbus::esp::failed_trial(fs, running)?;
            if failed.is_some() {
                nimbus::esp::clear_trial(fs, running)?;
            }
            Ok(())
        })
        .map_err(|e| ctx.esp_err(e))?;
    retry_bless(ctx, running, booted_good);
    let pending = ledger.get().stage1.stage1_pending.clone();
    match (failed, pending) {
        (Some(f), p) => {
            let install = p.unwrap_or(Stage1Install {
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
            let at = ctx.clock.now();
            ledger.edit(|s: &mut Stage1State| {
                s.stage1_failed = Some(Stage1Failure {
                    install,
                    running_copy: running,
                    reason,
                    blocked,
                    at,
                });
                s.stage1_pending = None;
            })?;
        }
        (None, Some(mut p)) if p.copy == running && !ctx.host.host_mode => {
            let mut blessed = false;
            let _ = ctx.host.esp.with(false, &mut |fs| {
                let env = nimbus::esp::grubenv(fs)?;
                blessed = env.trial().is_none() && env.default_copy() == running;
                Ok(())
            });
            ledger.edit(|s: &mut Stage1State| {
                if blessed {
                    s.stage1_pending = None;
                    s.stage1_failed = None;
                } else if !p.booted {
                    p.booted = true;
                    s.stage1_pending = Some(p);
                }
            })?;
        }
        _ => {}
    }
    Ok(())
}

/// A slot marked good whose stage 1 is not yet the loaders' default
/// (mark-good could not write the ESP: read-only, busy): bless it now.
/// Run at start and, while a failure is on record, at every check, so
/// a host heals once the ESP can be written. Never fatal.
fn retry_bless(ctx: &Ctx, running: nimbus::esp::Copy, booted_good: bool) {
    if ctx.host.host_mode || !booted_good {
        return;
    }
    let out = nimbus::esp::bless_recorded(
        &*ctx.host.esp,
        running,
        &ctx.host.root,
        ctx.clock.now().timestamp(),
    );
    if let Some(e) = out.record_error {
        tracing::warn!("recording the stage-1 bless: {e}");
    }
    match out.result {
        Ok(true) => tracing::info!("stage 1 copy {running} is now the default of both loaders"),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            "stage 1 copy {running} booted a good slot but is not the loaders' default: {e}"
        ),
    }
}

/// [`retry_bless`] while a failure is on record.
pub fn retry_recorded_bless(ctx: &Ctx, booted_good: bool) {
    if nimbus::esp::BlessFailure::read(&ctx.host.root).is_none() {
        return;
    }
    if let Some(running) = running_copy(ctx) {
        retry_bless(ctx, running, booted_good);
    }
}

/// The stage-1 copy running: the loader's `nimbus.stage1=`, or in host
/// mode the copy GRUB would start.
pub fn running_copy(ctx: &Ctx) -> Option<nimbus::esp::Copy> {
    if ctx.host.host_mode {
        let mut c = None;
        let _ = ctx.host.esp.with(false, &mut |fs| {
            c = Some(nimbus::esp::grubenv(fs)?.default_copy());
            Ok(())
        });
        return c;
    }
    let cmdline = nimbus::boot::booted_cmdline(&ctx.host.root).unwrap_or_default();
    nimbus::esp::running_copy(&cmdline)
}
