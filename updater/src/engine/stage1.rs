//! The boot chain's side of an update: stage 1's copies on the ESP (install,
//! a failed trial, the bless) and the trust rotations stage 1 reads there.

use super::*;

impl Engine {
    /// Install the release's stage 1 into the ESP's other copy, unless the
    /// running copy already is it, or it failed to boot here before.
    pub(super) fn install_stage1(
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

    pub(super) fn esp_err(&self, e: nimbus::esp::EspError) -> UpdateError {
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
        self.retry_bless(running);
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
                    at: self.clock.now(),
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

    /// A slot marked good whose stage 1 is not yet the loaders' default
    /// (mark-good could not write the ESP: read-only, busy): bless it now.
    /// Run at start and, while a failure is on record, at every check, so
    /// a host heals once the ESP can be written. Never fatal.
    pub(super) fn retry_bless(&mut self, running: nimbus::esp::Copy) {
        if self.host.host_mode || !self.booted_is_good() {
            return;
        }
        let out = nimbus::esp::bless_recorded(
            &*self.host.esp,
            running,
            &self.host.root,
            self.clock.now().timestamp(),
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

    /// [`Self::retry_bless`] while a failure is on record.
    pub(super) fn retry_recorded_bless(&mut self) {
        if nimbus::esp::BlessFailure::read(&self.host.root).is_none() {
            return;
        }
        if let Some(running) = self.running_copy() {
            self.retry_bless(running);
        }
    }

    /// The newest set the booted slot verifies under.
    pub(super) fn settle_active(&mut self) {
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

    pub(super) fn publish_trust(&self) {
        let cmdline = nimbus::boot::booted_cmdline(&self.host.root).unwrap_or_default();
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

    /// The stage-1 copy running: the loader's `nimbus.stage1=`, or in host
    /// mode the copy GRUB would start.
    pub(super) fn running_copy(&self) -> Option<nimbus::esp::Copy> {
        if self.host.host_mode {
            let mut c = None;
            let _ = self.host.esp.with(false, &mut |fs| {
                c = Some(nimbus::esp::grubenv(fs)?.default_copy());
                Ok(())
            });
            return c;
        }
        let cmdline = nimbus::boot::booted_cmdline(&self.host.root).unwrap_or_default();
        nimbus::esp::running_copy(&cmdline)
    }
}

/// Errors that say the bytes written so far are not the payload's: a
/// checkpoint saved during that attempt must not be resumed from. A cut
/// connection (`Truncated`, network errors) keeps it: that is what
/// checkpoints are for.
pub(super) fn read_esp_chain(
    esp: &dyn nimbus::esp::Esp,
) -> Result<Vec<Link>, nimbus::esp::EspError> {
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
pub(super) fn load_trust(host: &Host) -> Result<TrustView, UpdateError> {
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
