//! The reboot lock behind a narrow seam: the coordinator asks, takes and
//! gives back a slot; which backend answers is the strategy's business.
//! `etcd-lock` is locksmith's semaphore in etcd (`nimbus_etcd::lock`);
//! `fleetlock` is Zincati's protocol against a FleetLock server
//! (`crate::fleetlock`).

use std::path::Path;

use crate::error::UpdateError;
use crate::policy::{Lock, Strategy};
use nimbus_etcd::lock::LockError;

use super::Ctx;

pub trait RebootLock {
    /// The backend's name in metrics and messages.
    fn backend(&self) -> &'static str;
    /// This host's name in the lock.
    fn id(&self) -> &str;
    /// A name for the lock in logs and the state file.
    fn key(&self) -> String;
    /// What the lock says now, without taking anything. A backend that
    /// cannot tell without asking for a slot says `Free`.
    fn status(&self) -> Lock;
    /// Take a slot: `Held`, or why not.
    fn acquire(&self) -> Lock;
    /// Give the slot back: whether one was held (when the backend says).
    fn release(&self) -> Result<bool, String>;
}

/// The lock the configured strategy uses, `None` for strategies without
/// one. Counted in the metrics by backend and operation.
pub fn for_strategy(ctx: &Ctx) -> Result<Option<Box<dyn RebootLock + '_>>, UpdateError> {
    match ctx.cfg.strategy {
        Strategy::EtcdLock => Ok(Some(Box::new(Counted {
            ctx,
            inner: Etcd {
                ctx,
                id: super::machine_id(ctx.root())?,
            },
        }))),
        Strategy::FleetLock => {
            let Some(f) = &ctx.cfg.fleetlock else {
                return Err(UpdateError::Config {
                    path: ctx.root().join(nimbus::updateconf::ETC_PATH),
                    reason: "REBOOT_STRATEGY=fleetlock needs FLEETLOCK_URL".into(),
                });
            };
            let id = node_id(ctx.root())?;
            Ok(Some(Box::new(Counted {
                ctx,
                inner: crate::fleetlock::Client::new(f, id)?,
            })))
        }
        Strategy::Reboot | Strategy::Off => Ok(None),
    }
}

/// The etcd lock whatever the strategy (a lock taken under etcd-lock is
/// given back after a switch to a strategy without one).
pub fn etcd(ctx: &Ctx) -> Result<Box<dyn RebootLock + '_>, UpdateError> {
    Ok(Box::new(Counted {
        ctx,
        inner: Etcd {
            ctx,
            id: super::machine_id(ctx.root())?,
        },
    }))
}

/// This host's FleetLock id, from /etc/machine-id (never the id itself).
pub fn node_id(root: &Path) -> Result<String, UpdateError> {
    let mid = super::machine_id(root)?;
    nimbus::fleetlock::node_id(&mid).map_err(|reason| UpdateError::Config {
        path: root.join("etc/machine-id"),
        reason,
    })
}

struct Counted<'a, L> {
    ctx: &'a Ctx,
    inner: L,
}

impl<L: RebootLock> Counted<'_, L> {
    fn count(&self, op: &'static str, ok: bool) {
        let backend = self.inner.backend();
        self.ctx.shared.metric(|m| m.lock_request(backend, op, ok));
    }
}

fn answered(l: &Lock) -> bool {
    !matches!(l, Lock::Unavailable(_))
}

impl<L: RebootLock> RebootLock for Counted<'_, L> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn key(&self) -> String {
        self.inner.key()
    }
    fn status(&self) -> Lock {
        let l = self.inner.status();
        self.count("status", answered(&l));
        l
    }
    fn acquire(&self) -> Lock {
        let l = self.inner.acquire();
        self.count("acquire", answered(&l));
        l
    }
    fn release(&self) -> Result<bool, String> {
        let r = self.inner.release();
        self.count("release", r.is_ok());
        r
    }
}

/// locksmith's semaphore in etcd.
struct Etcd<'a> {
    ctx: &'a Ctx,
    id: String,
}

impl Etcd<'_> {
    fn client(&self) -> Result<nimbus_etcd::lock::LockClient, LockError> {
        nimbus_etcd::lock::LockClient::new(self.ctx.cfg.etcd.clone())
    }

    fn read(&self) -> Lock {
        match self.client().and_then(|c| c.get()) {
            Ok((s, _)) if s.holders.contains(&self.id) => Lock::Held,
            Ok((s, _)) if s.semaphore > 0 => Lock::Free,
            Ok((s, _)) => Lock::Full {
                holders: s.holders,
                max: s.max.max(0) as u64,
            },
            Err(e) => Lock::Unavailable(e.to_string()),
        }
    }
}

impl RebootLock for Etcd<'_> {
    fn backend(&self) -> &'static str {
        "etcd"
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn key(&self) -> String {
        nimbus_etcd::lock::key_for(self.ctx.cfg.etcd.group.as_deref())
    }
    fn status(&self) -> Lock {
        self.read()
    }
    fn acquire(&self) -> Lock {
        match self.client().and_then(|c| c.acquire(&self.id)) {
            Ok(true) => Lock::Held,
            // Lost to others: who holds it now, for the note.
            Ok(false) => match self.read() {
                Lock::Full { holders, max } => Lock::Full { holders, max },
                _ => Lock::Full {
                    holders: vec!["other hosts".into()],
                    max: 0,
                },
            },
            Err(LockError::Malformed { key, reason }) => {
                Lock::Unavailable(format!("{key}: malformed value ({reason})"))
            }
            Err(e) => Lock::Unavailable(e.to_string()),
        }
    }
    fn release(&self) -> Result<bool, String> {
        self.client()
            .and_then(|c| c.release(&self.id))
            .map_err(|e| e.to_string())
    }
}
