//! The channel reader: fetch and verify a channel's signed manifest,
//! choose from it, switch channels. It owns [`ChannelState`]: the serials
//! accepted (replays refused), the rollout seed, an allowed downgrade, and
//! the versions that failed here.

use std::path::Path;

use nimbus::release::{
    Manifest, ManifestError, ManifestPolicy, MAX_MANIFEST_BYTES, MAX_SIGNATURES_BYTES,
};

use super::{Ctx, TrustKeeper};
use crate::choose::{self, Choice};
use crate::error::{io_at, UpdateError};
use crate::state::{ChannelState, Ledger};

pub fn manifest_err(url: &str, source: ManifestError) -> UpdateError {
    UpdateError::Manifest {
        url: url.to_string(),
        source,
    }
}

/// Learn trust rotations first, then fetch `channels/<channel>.json` and
/// its signatures, verify, and record the serial.
pub fn fetch_manifest(
    ctx: &Ctx,
    trust: &mut TrustKeeper,
    ledger: &mut Ledger,
    channel: &str,
) -> Result<Manifest, UpdateError> {
    let server = ctx.server()?;
    trust.learn(ctx, server)?;
    let url = format!("{server}/{}", nimbus::repo::manifest_rel(channel));
    // One byte over the limit is enough for the verifier to say "too large".
    let bytes = ctx
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
    let sig_url = nimbus::repo::sig_of(&url);
    let sigs = ctx.http.get_small(&sig_url, MAX_SIGNATURES_BYTES, &|| {
        UpdateError::SignatureMissing {
            url: sig_url.clone(),
        }
    })?;
    accept(ctx, trust, ledger, channel, &url, &bytes, &sigs)
}

/// Air-gapped: a manifest and its signatures from files, checked as
/// online.
pub fn read_manifest(
    ctx: &Ctx,
    trust: &TrustKeeper,
    ledger: &mut Ledger,
    manifest: &Path,
    signatures: &Path,
) -> Result<Manifest, UpdateError> {
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
    let channel = ctx.cfg.group.clone();
    accept(
        ctx,
        trust,
        ledger,
        &channel,
        &manifest.display().to_string(),
        &bytes,
        &sigs,
    )
}

fn accept(
    ctx: &Ctx,
    trust: &TrustKeeper,
    ledger: &mut Ledger,
    channel: &str,
    from: &str,
    bytes: &[u8],
    sigs: &[u8],
) -> Result<Manifest, UpdateError> {
    let policy = ManifestPolicy {
        channel,
        now: ctx.clock.now(),
        last_serial: ledger.get().channel.last_serial.get(channel).copied(),
    };
    let m = Manifest::verify(bytes, sigs, trust.view().newest(), &policy)
        .map_err(|e| manifest_err(from, e))?;
    if policy.last_serial != Some(m.serial) {
        ledger.edit(|s: &mut ChannelState| s.last_serial.insert(channel.to_string(), m.serial))?;
    }
    Ok(m)
}

/// What the manifest offers this host now (`choose`, with its rollout
/// place, an allowed downgrade and the versions that failed here).
pub fn choose(ctx: &Ctx, ledger: &Ledger, m: &Manifest) -> Choice {
    let st = &ledger.get().channel;
    let allow_down = st.allow_downgrade.as_deref() == Some(ctx.cfg.group.as_str());
    choose::choose_excluding(
        m,
        &ctx.running,
        st.rollout_seed.unwrap_or(0.0),
        ctx.clock.now(),
        allow_down,
        &st.failed_versions,
    )
}

/// Draw this host's rollout place once.
pub fn ensure_seed(ledger: &mut Ledger) -> Result<(), UpdateError> {
    if ledger.get().channel.rollout_seed.is_some() {
        return Ok(());
    }
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b)
        .map_err(|e| UpdateError::Refused(format!("no randomness for the rollout seed: {e}")))?;
    let seed = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
    ledger.edit(|s: &mut ChannelState| s.rollout_seed = Some(seed))
}

/// Switch channels: GROUP is edited atomically only when the new channel
/// exists and verifies, and an older offer needs the operator's explicit
/// allowance.
pub fn switch(
    ctx: &Ctx,
    trust: &mut TrustKeeper,
    ledger: &mut Ledger,
    name: &str,
    allow_downgrade: bool,
) -> Result<String, UpdateError> {
    if !nimbus::release::valid_channel_name(name) {
        return Err(UpdateError::Refused(format!(
            "{name:?} is not a channel name ([a-z0-9._-]{{1,64}})"
        )));
    }
    let m = fetch_manifest(ctx, trust, ledger, name)?;
    let newest = m
        .releases
        .iter()
        .filter(|r| m.max_version.as_ref().is_none_or(|max| r.version <= *max))
        .map(|r| r.version.clone())
        .max();
    let running = &ctx.running;
    let (msg, allow) = match &newest {
        Some(v) if v < running && !allow_downgrade => {
            return Err(UpdateError::Downgrade {
                channel: name.to_string(),
                offered: v.to_string(),
                running: running.to_string(),
            })
        }
        Some(v) if v < running => (
            format!("switched to {name}; it offers {v}, older than the running {running}: the downgrade is allowed and will be installed"),
            Some(name.to_string()),
        ),
        Some(v) if v == running => (
            format!("switched to {name}; it offers nothing newer than the running {running}"),
            None,
        ),
        Some(v) => (
            format!("switched to {name}; it offers {v}, newer than the running {running}"),
            None,
        ),
        None => (format!("switched to {name}; it offers no releases yet"), None),
    };
    write_group(ctx.root(), name)?;
    ledger.edit(|s: &mut ChannelState| s.allow_downgrade = allow)?;
    Ok(msg)
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
