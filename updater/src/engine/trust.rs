//! The trust keeper: the trust sets this host knows (USR's built-in set and
//! the rotations learned since, docs/security.md "Rotating keys"), which of
//! them stage 1 may be given, and their copy on the ESP. It alone changes
//! [`TrustView`] and the chain under ROOT.

use nimbus::keys::TrustStore;
use nimbus::layout::Slot;
use nimbus::release::{SlotDescriptor, MAX_SIGNATURES_BYTES};
use nimbus::trust::Link;
use semver::Version;

use super::{Ctx, Host, Shared};
use crate::error::{io_at, UpdateError};
use crate::fetch::Transport;

/// The trust sets this host knows.
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

pub struct TrustKeeper {
    view: TrustView,
}

impl TrustKeeper {
    /// USR's built-in set advanced by the rotations stored on ROOT and those
    /// on the ESP (the ones stage 1 booted with: ROOT may have been wiped).
    /// A rotation that does not verify is reported and left out, never
    /// fatal: the host keeps the sets it could check.
    pub fn load(host: &Host) -> Result<TrustKeeper, UpdateError> {
        let p = host.root.join(nimbus::paths::TRUST_USR);
        let builtin = nimbus::trust::load(&p).map_err(|e| UpdateError::Config {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let dir = host.root.join(nimbus::paths::TRUST_CHAIN_ROOT);
        let (mut links, mut read_err) = match nimbus::chain::read(
            &nimbus::esp::DirEsp(host.root.clone()),
            nimbus::paths::TRUST_CHAIN_ROOT,
        ) {
            Ok(l) => (l, None),
            Err(e) => (Vec::new(), Some(format!("{}: {e}", dir.display()))),
        };
        let esp_links = match read_esp_chain(&*host.esp) {
            Ok(l) => l,
            Err(e) => {
                read_err.get_or_insert(format!("ESP: {e}"));
                Vec::new()
            }
        };
        let on_esp = esp_links.clone();
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
        // How far stage 1's copy goes: the verified links it holds intact,
        // in order. A damaged one (a torn write) stops it there, so that
        // `sync_to_esp` writes it again.
        links.sort_by_key(|l| l.version);
        let mut esp_version = None;
        for l in &links {
            let intact = on_esp
                .iter()
                .any(|e| e.version == l.version && e.bytes == l.bytes && e.sigs == l.sigs);
            if !intact {
                break;
            }
            esp_version = Some(l.version);
        }
        Ok(TrustKeeper {
            view: TrustView {
                sets,
                links,
                active: 0,
                chain_error,
                esp_version,
            },
        })
    }

    pub fn view(&self) -> &TrustView {
        &self.view
    }

    /// The booted slot was checked by stage 1; what it verifies under is
    /// the newest set that stage 1 may be given. Returns its version.
    pub fn settle_booted(&mut self, host: &Host) -> Result<Version, UpdateError> {
        let booted = Slot::from_partition_number(host.booted).ok_or_else(|| {
            UpdateError::NoBootedSlot(format!("partition {} is not a USR slot", host.booted))
        })?;
        let desc = host.storage.gpt(false)?.read_descriptor(booted)?;
        let verified = self.view.sets.iter().enumerate().rev().find_map(|(i, t)| {
            SlotDescriptor::verify(&desc, t)
                .ok()
                .map(|d| (i, d.version))
        });
        let (active, version) = verified.ok_or_else(|| {
            UpdateError::NoBootedSlot(format!(
                "the booted slot (partition {}) has no descriptor valid under any known trust set",
                host.booted
            ))
        })?;
        self.view.active = active;
        Ok(version)
    }

    /// Learn the trust rotations the repository published since the newest
    /// set this host knows (`trust/<n+1>.json`, until a 404), each checked
    /// against the one before and stored on ROOT before it is used. Done
    /// before the manifest is read, as TUF updates its root first, so a
    /// manifest signed by new keys is understood.
    pub fn learn(&mut self, ctx: &Ctx, server: &str) -> Result<(), UpdateError> {
        let r = self.learn_from(ctx.http.as_ref(), &ctx.host, server);
        self.publish(&ctx.host, &ctx.shared);
        r
    }

    fn learn_from(
        &mut self,
        http: &dyn Transport,
        host: &Host,
        server: &str,
    ) -> Result<(), UpdateError> {
        let dir = host.root.join(nimbus::paths::TRUST_CHAIN_ROOT);
        for _ in 0..nimbus::trust::MAX_CHAIN {
            let next = self.view.newest().version + 1;
            let url = format!("{server}/{}", nimbus::trust::repo_path(next));
            let Some(bytes) = http.get_small_opt(&url, nimbus::trust::MAX_TRUST_BYTES + 1)? else {
                return Ok(());
            };
            let sig_url = nimbus::repo::sig_of(&url);
            // A set published without its signatures yet: the next check.
            let Some(sigs) = http.get_small_opt(&sig_url, MAX_SIGNATURES_BYTES)? else {
                return Ok(());
            };
            let set =
                nimbus::trust::advance(self.view.newest(), &bytes, &sigs).map_err(|source| {
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
            nimbus::chain::write(
                &nimbus::esp::DirEsp(host.root.clone()),
                nimbus::paths::TRUST_CHAIN_ROOT,
                std::slice::from_ref(&link),
            )
            .map_err(|e| UpdateError::Config {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
            tracing::info!("learned trust set {} from {url}", set.summary());
            self.view.sets.push(set);
            self.view.links.push(link);
            self.settle_active(host);
        }
        Ok(())
    }

    /// The newest set the booted slot verifies under.
    fn settle_active(&mut self, host: &Host) {
        let Some(slot) = Slot::from_partition_number(host.booted) else {
            return;
        };
        let Ok(desc) = host
            .storage
            .gpt(false)
            .and_then(|mut d| d.read_descriptor(slot))
        else {
            return;
        };
        let v = &mut self.view;
        if let Some(i) = (v.active..v.sets.len())
            .rev()
            .find(|&i| SlotDescriptor::verify(&desc, &v.sets[i]).is_ok())
        {
            v.active = i;
        }
    }

    /// Give stage 1 (through the ESP) the rotations up to the active set,
    /// once the booted slot is proven (`booted_good`): before that, a
    /// fallback to the other slot must still find the keys that signed it.
    /// Never fatal: stage 1 keeps booting with what it has.
    pub fn sync_to_esp(&mut self, host: &Host, shared: &Shared, booted_good: bool) {
        let want = self.view.active().version;
        if self.view.esp_version.is_some_and(|v| v >= want) || !booted_good {
            return;
        }
        let on_esp = match read_esp_chain(&*host.esp) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("reading the trust rotations on the ESP: {e}");
                return;
            }
        };
        let have: std::collections::BTreeSet<u64> = on_esp.iter().map(|l| l.version).collect();
        let missing: Vec<Link> = self
            .view
            .links
            .iter()
            .filter(|l| l.version <= want && !have.contains(&l.version))
            .cloned()
            .collect();
        // A link on the ESP that differs from the verified one of the same
        // version is damaged (a power cut tore its write; FAT has no
        // journal): it ends stage 1's chain there, so it is written again.
        let damaged: Vec<Link> = self
            .view
            .links
            .iter()
            .filter(|l| {
                l.version <= want
                    && on_esp
                        .iter()
                        .any(|e| e.version == l.version && (e.bytes != l.bytes || e.sigs != l.sigs))
            })
            .cloned()
            .collect();
        if !damaged.is_empty() {
            let vs: Vec<String> = damaged.iter().map(|l| l.version.to_string()).collect();
            tracing::warn!(
                "trust rotation(s) {} on the ESP are damaged; writing them again",
                vs.join(", ")
            );
        }
        if !missing.is_empty() || !damaged.is_empty() {
            if let Err(e) = host.esp.with(true, &mut |fs| {
                nimbus::chain::repair(fs, nimbus::esp::CHAIN_DIR, &damaged)?;
                nimbus::chain::write(fs, nimbus::esp::CHAIN_DIR, &missing)
            }) {
                tracing::warn!("copying trust rotations to the ESP: {e}");
                return;
            }
            tracing::info!(
                "stage 1 will use trust set {} from the next boot",
                self.view.active().summary()
            );
        }
        self.view.esp_version = Some(want.max(have.last().copied().unwrap_or(0)));
        self.publish(host, shared);
    }

    /// Show the sets in the status.
    pub fn publish(&self, host: &Host, shared: &Shared) {
        let cmdline = nimbus::boot::booted_cmdline(&host.root).unwrap_or_default();
        let stage1 = if host.host_mode {
            None
        } else {
            nimbus::trust::parse_cmdline_arg(&cmdline)
        };
        let t = &self.view;
        let info = crate::status::TrustStatus {
            usr: crate::status::TrustSetInfo::of(t.newest()),
            usr_builtin_version: t.sets[0].version,
            active_version: t.active().version,
            esp_version: t.esp_version,
            stage1,
            chain_error: t.chain_error.clone(),
        };
        shared.update(|s| s.trust = Some(info));
    }
}

fn read_esp_chain(esp: &dyn nimbus::esp::Esp) -> Result<Vec<Link>, nimbus::esp::EspError> {
    let mut out = Vec::new();
    esp.with(false, &mut |fs| {
        out = nimbus::chain::read(fs, nimbus::esp::CHAIN_DIR)?;
        Ok(())
    })?;
    Ok(out)
}
