//! The reboot coordinator: when a staged slot may be booted (strategy,
//! window, the etcd semaphore) and the lock's release once the new slot is
//! good.

use super::*;

impl Engine {
    /// This host's name in the reboot semaphore: /etc/machine-id.
    pub fn machine_id(&self) -> Result<String, UpdateError> {
        let p = self.host.root.join("etc/machine-id");
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

    pub(super) fn lock_client(&self) -> Result<crate::lock::LockClient, crate::lock::LockError> {
        crate::lock::LockClient::new(self.cfg.etcd.clone())
    }

    pub(super) fn booted_is_good(&self) -> bool {
        self.slots().is_ok_and(|v| v.booted_is_good())
    }

    /// One step of reboot coordination: give back a lock held from before a
    /// reboot once this boot is good, then judge strategy, window and lock
    /// for a staged update. Returns what to do; the note in the status says
    /// why when the answer is to wait.
    pub fn reboot_step(&mut self) -> Result<crate::policy::Decision, UpdateError> {
        use crate::lock::LockError;
        use crate::policy::{decide, Decision, Lock, Strategy};
        self.refresh();
        self.sync_stage1_trust();
        let view = self.slots()?;
        let staged = view.staged().is_some();
        if let Some(key) = self.persisted.lock_taken.clone() {
            if !staged && view.booted_is_good() {
                let id = self.machine_id()?;
                match self.lock_client().and_then(|c| c.release(&id)) {
                    Ok(held) => {
                        tracing::info!("reboot lock {key}: released by {id} (held: {held}); the booted slot is good");
                        self.persisted.lock_taken = None;
                        self.store.save(&self.persisted)?;
                    }
                    Err(e) => {
                        // Kept in the state file: retried on the next step, never lost.
                        tracing::warn!("reboot lock {key}: cannot release yet: {e}");
                        self.shared.update(|s| {
                            s.note = Some(format!("cannot release the reboot lock yet: {e}"))
                        });
                    }
                }
            }
        }
        let now = chrono::Local::now().naive_local();
        let strategy = self.cfg.strategy;
        let window = self.cfg.window;
        let mut lock = Lock::NotAsked;
        if staged && strategy == Strategy::EtcdLock && window.is_none_or(|w| w.contains(now)) {
            let id = self.machine_id()?;
            lock = match self.lock_client().and_then(|c| c.get()) {
                Ok((s, _)) if s.holders.contains(&id) => Lock::Held,
                Ok((s, _)) if s.semaphore > 0 => Lock::Free,
                Ok((s, _)) => Lock::Full {
                    holders: s.holders,
                    max: s.max.max(0) as u64,
                },
                Err(e) => Lock::Unavailable(e.to_string()),
            };
        }
        let mut d = decide(staged, strategy, window.as_ref(), &lock, now);
        if d == Decision::TakeLock {
            let id = self.machine_id()?;
            let client = self.lock_client();
            // Persist the intent first: a crash right after the CAS must
            // still lead to a release on the next boot.
            let key = crate::lock::key_for(self.cfg.etcd.group.as_deref());
            self.persisted.lock_taken = Some(key.clone());
            self.store.save(&self.persisted)?;
            let got = client.and_then(|c| c.acquire(&id));
            lock = match got {
                Ok(true) => {
                    tracing::info!("reboot lock {key}: taken by {id}");
                    Lock::Held
                }
                Ok(false) => Lock::Full {
                    holders: vec!["other hosts".into()],
                    max: 0,
                },
                Err(LockError::Malformed { key, reason }) => {
                    Lock::Unavailable(format!("{key}: malformed value ({reason})"))
                }
                Err(e) => Lock::Unavailable(e.to_string()),
            };
            // Only a definite "no" clears the intent; after an error the CAS
            // may have gone through, and a release of a slot never held is
            // harmless, so the intent stays.
            if matches!(lock, Lock::Full { .. }) {
                self.persisted.lock_taken = None;
                self.store.save(&self.persisted)?;
            }
            d = decide(staged, strategy, window.as_ref(), &lock, now);
            if let (Decision::Wait { .. }, Ok((s, _))) =
                (&d, self.lock_client().and_then(|c| c.get()))
            {
                d = decide(
                    staged,
                    strategy,
                    window.as_ref(),
                    &Lock::Full {
                        holders: s.holders,
                        max: s.max.max(0) as u64,
                    },
                    now,
                );
            }
        }
        if let Decision::Wait { why, .. } = &d {
            let why = why.clone();
            self.shared.update(|s| s.note = Some(why));
        }
        Ok(d)
    }
}
