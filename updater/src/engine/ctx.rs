//! The handles every owner of the engine uses and none owns: the host, the
//! configuration, the network, the clock, the status board and the running
//! version. Owners borrow it; only the engine loop changes it.

use std::path::Path;

use nimbus::layout::Slot;
use semver::Version;

use super::{Clock, Host, Shared, SlotView, TrustView};
use crate::config::EngineConfig;
use crate::error::UpdateError;
use crate::fetch::Transport;
use crate::status::State;

pub struct Ctx {
    pub host: Host,
    pub cfg: EngineConfig,
    pub http: Box<dyn Transport>,
    pub clock: Box<dyn Clock>,
    pub shared: std::sync::Arc<Shared>,
    /// The booted slot's version, verified at start.
    pub running: Version,
}

impl Ctx {
    /// What a write of `release` into `slot` reads and obeys: this
    /// engine's transport, I/O limits and cancel flag (full and delta
    /// installs alike).
    pub fn stream<'a>(
        &'a self,
        release: &'a nimbus::release::Release,
        slot: &'a crate::target::SlotDevice,
        progress: &'a (dyn Fn(crate::status::Progress) + Sync),
    ) -> crate::writer::Stream<'a> {
        crate::writer::Stream {
            http: self.http.as_ref(),
            release,
            slot,
            limits: self.cfg.limits(),
            cancel: &self.shared.cancel,
            progress,
        }
    }

    pub fn root(&self) -> &Path {
        &self.host.root
    }

    /// The repository base URL, or `Disabled` (SERVER=disabled).
    pub fn server(&self) -> Result<&str, UpdateError> {
        self.cfg.server.as_deref().ok_or(UpdateError::Disabled)
    }

    /// The slots now: one GPT read (`SlotView`).
    pub fn slots(&self, trust: &TrustView) -> Result<SlotView, UpdateError> {
        SlotView::read(self.host.storage.as_ref(), self.host.booted, trust)
    }

    pub fn passive(&self) -> Result<u32, UpdateError> {
        SlotView {
            booted: self.host.booted,
            entries: Vec::new(),
        }
        .passive()
    }

    pub fn booted_is_good(&self, trust: &TrustView) -> bool {
        self.slots(trust).is_ok_and(|v| v.booted_is_good())
    }

    /// Installing overwrites the passive slot, which is the fallback while
    /// the running slot is unproven: wait for mark-good first, as ChromeOS
    /// and Flatcar do.
    pub fn ensure_proven(&self, trust: &TrustView) -> Result<(), UpdateError> {
        if self.booted_is_good(trust) {
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

    pub fn set_state(&self, st: State) {
        self.shared.update(|s| s.state = st);
    }

    pub fn esp_err(&self, e: nimbus::esp::EspError) -> UpdateError {
        UpdateError::Config {
            path: self.host.disk.clone(),
            reason: format!("EFI system partition: {e}"),
        }
    }

    /// Fetch a file the signed manifest lists, whole (its size and sha256
    /// from the manifest): a stage-1 file or a delta index.
    pub fn fetch_file(&self, f: &nimbus::release::FileRef) -> Result<Vec<u8>, UpdateError> {
        use sha2::Digest;
        let url = format!("{}/{}", self.server()?, f.path);
        let mut body = self.http.get_listed(&url)?;
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
}
