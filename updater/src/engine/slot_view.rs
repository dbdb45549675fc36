//! The slots as the engine sees them at one moment: one GPT read, each
//! USR slot's verified version. Staged, proven and the status rows are
//! pure functions of it.

use nimbus::layout::Slot;
use nimbus::release::SlotDescriptor;
use nimbus::slots::Prio;
use semver::Version;

use super::{Storage, TrustView};
use crate::error::UpdateError;
use crate::status::SlotInfo;

#[derive(Debug, Clone, PartialEq)]
pub struct ViewEntry {
    pub number: u32,
    pub prio: Prio,
    /// The verified version: the booted slot under the set it booted
    /// with, the other under the newest (a slot signed by a removed key
    /// reads as invalid).
    pub version: Option<Version>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SlotView {
    pub booted: u32,
    pub entries: Vec<ViewEntry>,
}

impl SlotView {
    pub fn read(
        storage: &dyn Storage,
        booted: u32,
        trust: &TrustView,
    ) -> Result<SlotView, UpdateError> {
        let mut d = storage.gpt(false)?;
        let mut entries = Vec::new();
        for e in d.slot_table() {
            let version = match Slot::from_partition_number(e.number) {
                Some(slot) => {
                    let set = if e.number == booted {
                        trust.active()
                    } else {
                        trust.newest()
                    };
                    d.read_descriptor(slot)
                        .ok()
                        .and_then(|b| SlotDescriptor::verify(&b, set).ok())
                        .map(|d| d.version)
                }
                None => None,
            };
            entries.push(ViewEntry {
                number: e.number,
                prio: e.prio(),
                version,
            });
        }
        Ok(SlotView { booted, entries })
    }

    pub fn entry(&self, n: u32) -> Option<&ViewEntry> {
        self.entries.iter().find(|e| e.number == n)
    }

    pub fn passive(&self) -> Result<u32, UpdateError> {
        let booted = Slot::from_partition_number(self.booted).ok_or_else(|| {
            UpdateError::NoBootedSlot(format!("partition {} is not a USR slot", self.booted))
        })?;
        Ok(booted.other().partition_number())
    }

    /// The version staged in the passive slot for the next boot: bootable,
    /// not yet proven, above the booted slot.
    pub fn staged(&self) -> Option<Version> {
        let e = self.entry(self.passive().ok()?)?;
        let booted = self.entry(self.booted)?;
        let p = e.prio;
        if p.bootable() && !p.successful && p.priority > booted.prio.priority {
            e.version.clone()
        } else {
            None
        }
    }

    /// The booted slot was marked good.
    pub fn booted_is_good(&self) -> bool {
        self.entry(self.booted).is_some_and(|e| e.prio.successful)
    }

    pub fn infos(&self) -> Vec<SlotInfo> {
        self.entries
            .iter()
            .map(|e| SlotInfo {
                label: Slot::from_partition_number(e.number)
                    .map_or_else(|| format!("#{}", e.number), |s| s.label().to_string()),
                partition: e.number,
                priority: e.prio.priority,
                tries: e.prio.tries,
                successful: e.prio.successful,
                version: e.version.as_ref().map(|v| v.to_string()),
                booted: e.number == self.booted,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(number: u32, priority: u8, tries: u8, successful: bool, v: &str) -> ViewEntry {
        ViewEntry {
            number,
            prio: Prio {
                priority,
                tries,
                successful,
            },
            version: Some(v.parse().unwrap()),
        }
    }

    #[test]
    fn staged_means_bootable_unproven_and_above_the_booted_slot() {
        let view = |b: ViewEntry| SlotView {
            booted: 3,
            entries: vec![entry(3, 1, 0, true, "1.0.0"), b],
        };
        assert_eq!(
            view(entry(4, 2, 1, false, "1.1.0")).staged(),
            Some("1.1.0".parse().unwrap())
        );
        // Invalidated, proven, or below the booted slot: not staged.
        assert_eq!(view(entry(4, 0, 0, false, "1.1.0")).staged(), None);
        assert_eq!(view(entry(4, 2, 0, true, "1.1.0")).staged(), None);
        assert_eq!(view(entry(4, 1, 1, false, "1.1.0")).staged(), None);
        assert!(view(entry(4, 0, 0, false, "1.1.0")).booted_is_good());
        let unproven = SlotView {
            booted: 4,
            entries: vec![
                entry(3, 1, 0, true, "1.0.0"),
                entry(4, 2, 0, false, "1.1.0"),
            ],
        };
        assert!(!unproven.booted_is_good());
        assert_eq!(unproven.passive().unwrap(), 3);
        assert_eq!(unproven.infos()[1].version.as_deref(), Some("1.1.0"));
    }
}
