//! The A/B slot protocol: ChromeOS/CoreOS `gptprio` bits in a GPT entry's
//! 64-bit attribute field (the bits: the constants below; how boots use them: docs/boot.md).
//!
//! Everything here is pure: it maps attribute words to attribute words. The
//! disk side lives in [`crate::gpt`]. Functions take a table of every USR
//! partition so the rules hold for any number of slots, not just two.

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;
const NIBBLE: u64 = 0xF;
/// Bits 48-56: what gptprio owns. Everything else belongs to someone else.
pub const GPTPRIO_MASK: u64 = (NIBBLE << PRIORITY_SHIFT) | (NIBBLE << TRIES_SHIFT) | SUCCESSFUL_BIT;

pub const MAX_PRIORITY: u8 = 15;
pub const MAX_TRIES: u8 = 15;

/// The decoded gptprio fields of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Prio {
    pub priority: u8,
    pub tries: u8,
    pub successful: bool,
}

impl Prio {
    pub fn from_bits(bits: u64) -> Prio {
        Prio {
            priority: ((bits >> PRIORITY_SHIFT) & NIBBLE) as u8,
            tries: ((bits >> TRIES_SHIFT) & NIBBLE) as u8,
            successful: bits & SUCCESSFUL_BIT != 0,
        }
    }

    /// Write these fields into `bits`, leaving bits outside [`GPTPRIO_MASK`]
    /// exactly as they were. Values above 15 are clamped: the field is 4 bits.
    pub fn apply_to(self, bits: u64) -> u64 {
        let p = u64::from(self.priority.min(MAX_PRIORITY));
        let t = u64::from(self.tries.min(MAX_TRIES));
        (bits & !GPTPRIO_MASK)
            | (p << PRIORITY_SHIFT)
            | (t << TRIES_SHIFT)
            | if self.successful { SUCCESSFUL_BIT } else { 0 }
    }

    /// May the boot rule pick this slot?
    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.successful || self.tries > 0)
    }
}

/// One USR partition in a slot table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub number: u32,
    pub attributes: u64,
}

impl Entry {
    pub fn prio(&self) -> Prio {
        Prio::from_bits(self.attributes)
    }
    fn set(&mut self, p: Prio) {
        self.attributes = p.apply_to(self.attributes);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("partition {0} is not a USR slot of this disk")]
    NoSuchSlot(u32),
    #[error(
        "partition {0} is not bootable (priority 0, or neither successful nor any tries left)"
    )]
    NotBootable(u32),
}

fn find(table: &mut [Entry], number: u32) -> Result<&mut Entry, SlotError> {
    table
        .iter_mut()
        .find(|e| e.number == number)
        .ok_or(SlotError::NoSuchSlot(number))
}

/// What the boot rule chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub number: u32,
    /// The slot's fields as they were before the decrement.
    pub before: Prio,
    /// True when tries were decremented, so the table must be written back
    /// before the slot is used.
    pub changed: bool,
}

/// The boot rule: among bootable slots not in `exclude`, the highest priority
/// wins, ties going to the lower partition number. An unproven slot
/// (successful=0) pays one try for being chosen.
///
/// `exclude` lets stage-1 move on to the next candidate in the same boot when
/// the chosen slot fails verification.
pub fn select_for_boot(table: &mut [Entry], exclude: &[u32]) -> Option<Choice> {
    let idx = table
        .iter()
        .enumerate()
        .filter(|(_, e)| e.prio().bootable() && !exclude.contains(&e.number))
        // max_by_key returns the last maximum; reverse the number so that the
        // lowest number is the greatest key among equal priorities.
        .max_by_key(|(_, e)| (e.prio().priority, std::cmp::Reverse(e.number)))
        .map(|(i, _)| i)?;
    let entry = &mut table[idx];
    let before = entry.prio();
    let changed = !before.successful;
    if changed {
        entry.set(Prio {
            tries: before.tries - 1,
            ..before
        });
    }
    Some(Choice {
        number: entry.number,
        before,
        changed,
    })
}

/// Make `number` the unique highest priority, the way cgpt's `prioritize` does:
/// it gets one more than the highest other priority, and when that would pass
/// 15 the others are renumbered 1..k in their old order first. Priority 0
/// stays 0: it means "never boot" and only an explicit write may change it.
/// The target's tries and successful flag are left alone.
pub fn raise_priority(table: &mut [Entry], number: u32) -> Result<(), SlotError> {
    find(table, number)?;
    let max_other = table
        .iter()
        .filter(|e| e.number != number)
        .map(|e| e.prio().priority)
        .max()
        .unwrap_or(0);
    let target = if max_other < MAX_PRIORITY {
        max_other + 1
    } else {
        let mut distinct: Vec<u8> = table
            .iter()
            .filter(|e| e.number != number)
            .map(|e| e.prio().priority)
            .filter(|&p| p > 0)
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        for e in table.iter_mut().filter(|e| e.number != number) {
            let p = e.prio();
            if p.priority > 0 {
                // Position in the sorted list, plus one: never 0.
                let rank = distinct.iter().position(|&d| d == p.priority).unwrap_or(0) as u8 + 1;
                e.set(Prio {
                    priority: rank,
                    ..p
                });
            }
        }
        distinct.len() as u8 + 1
    };
    let e = find(table, number)?;
    let p = e.prio();
    e.set(Prio {
        priority: target,
        ..p
    });
    Ok(())
}

/// After the updater wrote and verified a new slot: one boot attempt, unproven,
/// ahead of every other slot.
pub fn prioritize(table: &mut [Entry], number: u32) -> Result<(), SlotError> {
    raise_priority(table, number)?;
    let e = find(table, number)?;
    let p = e.prio();
    e.set(Prio {
        tries: 1,
        successful: false,
        ..p
    });
    Ok(())
}

/// The booted slot proved healthy: successful, no tries needed, and top
/// priority (it may have been booted as a fallback under a higher-priority
/// slot that failed).
pub fn mark_good(table: &mut [Entry], number: u32) -> Result<(), SlotError> {
    let p = find(table, number)?.prio();
    let others_max = table
        .iter()
        .filter(|e| e.number != number)
        .map(|e| e.prio().priority)
        .max()
        .unwrap_or(0);
    if p.priority == 0 || p.priority <= others_max {
        raise_priority(table, number)?;
    }
    let e = find(table, number)?;
    let p = e.prio();
    e.set(Prio {
        tries: 0,
        successful: true,
        ..p
    });
    Ok(())
}

/// Before a slot is overwritten: never bootable, so a torn write cannot be
/// chosen.
pub fn invalidate(table: &mut [Entry], number: u32) -> Result<(), SlotError> {
    let e = find(table, number)?;
    e.set(Prio::default());
    Ok(())
}

/// Manual rollback from `booted`: the other slot with the highest priority
/// that is still bootable.
pub fn rollback_target(table: &[Entry], booted: u32) -> Result<u32, SlotError> {
    if !table.iter().any(|e| e.number == booted) {
        return Err(SlotError::NoSuchSlot(booted));
    }
    table
        .iter()
        .filter(|e| e.number != booted && e.prio().bootable())
        .max_by_key(|e| (e.prio().priority, std::cmp::Reverse(e.number)))
        .map(|e| e.number)
        .ok_or(SlotError::NotBootable(booted))
}

/// Roll back: make the rollback target the top priority, keeping its
/// successful flag (it was proven before).
pub fn rollback(table: &mut [Entry], booted: u32) -> Result<u32, SlotError> {
    let target = rollback_target(table, booted)?;
    raise_priority(table, target)?;
    Ok(target)
}

/// What a failed boot-health check on `booted` leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthFailureAction {
    /// The slot was proven before: stay (rebooting would come back to it).
    StayProven,
    /// Unproven, but nothing else is bootable: stay up.
    NoFallback,
    /// Unproven: give it up; this slot boots next.
    FallBack(u32),
}

pub fn on_health_failure(table: &[Entry], booted: u32) -> HealthFailureAction {
    if table
        .iter()
        .find(|e| e.number == booted)
        .is_some_and(|e| e.prio().successful)
    {
        return HealthFailureAction::StayProven;
    }
    match rollback_target(table, booted) {
        Ok(n) => HealthFailureAction::FallBack(n),
        Err(_) => HealthFailureAction::NoFallback,
    }
}

/// Slots other than `booted` that were given their one try and never
/// proven: priority still set, no tries left, not successful. Only a boot
/// attempt leads there ([`prioritize`] gives one try, [`select_for_boot`]
/// takes it, [`mark_good`] would have set successful), so running on
/// another slot while one is in this state means the host rolled back.
pub fn failed_attempts(table: &[Entry], booted: u32) -> Vec<u32> {
    table
        .iter()
        .filter(|e| {
            let p = e.prio();
            e.number != booted && p.priority > 0 && p.tries == 0 && !p.successful
        })
        .map(|e| e.number)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn e(number: u32, priority: u8, tries: u8, successful: bool) -> Entry {
        Entry {
            number,
            attributes: Prio {
                priority,
                tries,
                successful,
            }
            .apply_to(0),
        }
    }

    #[test]
    fn bit_positions_match_cgpt() {
        // cgpt add -P 2 -T 1 -S 1 on a zeroed entry gives this word.
        let bits = Prio {
            priority: 2,
            tries: 1,
            successful: true,
        }
        .apply_to(0);
        assert_eq!(bits, 0x0112_0000_0000_0000);
        assert_eq!(Prio::from_bits(bits).priority, 2);
    }

    #[test]
    fn fresh_update_flow() {
        let mut t = [e(3, 1, 0, true), e(4, 0, 0, false)];
        prioritize(&mut t, 4).unwrap();
        assert_eq!(
            t[1].prio(),
            Prio {
                priority: 2,
                tries: 1,
                successful: false
            }
        );
        assert_eq!(
            t[0].prio(),
            Prio {
                priority: 1,
                tries: 0,
                successful: true
            }
        );
        let c = select_for_boot(&mut t, &[]).unwrap();
        assert_eq!((c.number, c.changed), (4, true));
        assert_eq!(t[1].prio().tries, 0);
        // It never got marked good: the next boot falls back to A.
        let c = select_for_boot(&mut t, &[]).unwrap();
        assert_eq!((c.number, c.changed), (3, false));
    }

    #[test]
    fn mark_good_after_fallback_takes_top_priority() {
        let mut t = [e(3, 1, 0, true), e(4, 2, 0, true)];
        // B was chosen but failed verity; A booted instead and is healthy.
        mark_good(&mut t, 3).unwrap();
        assert!(t[0].prio().priority > t[1].prio().priority);
        assert!(t[0].prio().successful);
    }

    #[test]
    fn tie_goes_to_lower_number() {
        let mut t = [e(4, 5, 0, true), e(3, 5, 0, true)];
        assert_eq!(select_for_boot(&mut t, &[]).unwrap().number, 3);
    }

    #[test]
    fn exclude_moves_to_next_candidate() {
        let mut t = [e(3, 1, 0, true), e(4, 2, 1, false)];
        let c = select_for_boot(&mut t, &[4]).unwrap();
        assert_eq!(c.number, 3);
        assert_eq!(t[1].prio().tries, 1, "excluded slot untouched");
    }

    #[test]
    fn rollback_needs_a_bootable_other_slot() {
        let t = [e(3, 1, 0, true), e(4, 0, 0, false)];
        assert_eq!(rollback_target(&t, 3), Err(SlotError::NotBootable(3)));
        let mut t = [e(3, 1, 0, true), e(4, 2, 0, true)];
        assert_eq!(rollback(&mut t, 4), Ok(3));
        assert_eq!(select_for_boot(&mut t, &[]).unwrap().number, 3);
    }

    #[test]
    fn prioritize_compresses_at_fifteen() {
        let mut t = [e(3, 15, 0, true), e(4, 14, 0, true), e(5, 0, 0, false)];
        prioritize(&mut t, 4).unwrap();
        assert_eq!(t[0].prio().priority, 1);
        assert_eq!(t[1].prio().priority, 2);
        assert_eq!(t[2].prio().priority, 0);
    }

    fn arb_table() -> impl Strategy<Value = Vec<Entry>> {
        prop::collection::vec(any::<u64>(), 1..6).prop_map(|words| {
            words
                .into_iter()
                .enumerate()
                .map(|(i, attributes)| Entry {
                    number: i as u32 + 3,
                    attributes,
                })
                .collect()
        })
    }

    fn foreign(t: &[Entry]) -> Vec<u64> {
        t.iter().map(|e| e.attributes & !GPTPRIO_MASK).collect()
    }

    proptest! {
        #[test]
        fn selection_is_sound(mut t in arb_table()) {
            let before = t.clone();
            let mut again = t.clone();
            match select_for_boot(&mut t, &[]) {
                None => prop_assert!(before.iter().all(|e| !e.prio().bootable())),
                Some(c) => {
                    prop_assert!(c.before.priority > 0);
                    prop_assert!(c.before.successful || c.before.tries > 0);
                    prop_assert!(before.iter().filter(|e| e.prio().bootable())
                        .all(|e| e.prio().priority <= c.before.priority));
                    // Deterministic.
                    prop_assert_eq!(select_for_boot(&mut again, &[]), Some(c));
                    prop_assert_eq!(&again, &t);
                }
            }
            prop_assert_eq!(foreign(&before), foreign(&t));
        }

        #[test]
        fn prioritize_gives_unique_top(mut t in arb_table(), pick in any::<prop::sample::Index>()) {
            let before = t.clone();
            let n = t[pick.index(t.len())].number;
            prioritize(&mut t, n).unwrap();
            let top = t.iter().find(|e| e.number == n).unwrap().prio();
            prop_assert_eq!(top.tries, 1);
            prop_assert!(!top.successful);
            for (b, a) in before.iter().zip(&t) {
                if a.number == n { continue; }
                prop_assert!(a.prio().priority < top.priority);
                // Priority 0 stays 0, nonzero stays nonzero, tries/successful untouched.
                prop_assert_eq!(b.prio().priority == 0, a.prio().priority == 0);
                prop_assert_eq!(b.prio().tries, a.prio().tries);
                prop_assert_eq!(b.prio().successful, a.prio().successful);
            }
            // Relative order of the others is preserved.
            for (x, y) in before.iter().zip(&t) {
                for (x2, y2) in before.iter().zip(&t) {
                    if x.number == n || x2.number == n { continue; }
                    if x.prio().priority < x2.prio().priority {
                        prop_assert!(y.prio().priority <= y2.prio().priority);
                    }
                }
            }
            prop_assert_eq!(foreign(&before), foreign(&t));
            // The freshly prioritized slot is what the next boot picks.
            prop_assert_eq!(select_for_boot(&mut t, &[]).unwrap().number, n);
        }

        #[test]
        fn mark_good_and_invalidate_keep_foreign_bits(mut t in arb_table(), pick in any::<prop::sample::Index>()) {
            let before = t.clone();
            let n = t[pick.index(t.len())].number;
            mark_good(&mut t, n).unwrap();
            let p = t.iter().find(|e| e.number == n).unwrap().prio();
            prop_assert!(p.successful && p.tries == 0 && p.priority > 0);
            prop_assert!(t.iter().filter(|e| e.number != n).all(|e| e.prio().priority < p.priority));
            prop_assert_eq!(select_for_boot(&mut t.clone(), &[]).unwrap().number, n);
            invalidate(&mut t, n).unwrap();
            prop_assert!(!t.iter().find(|e| e.number == n).unwrap().prio().bootable());
            prop_assert_eq!(foreign(&before), foreign(&t));
        }

        #[test]
        fn prio_roundtrip(bits in any::<u64>()) {
            let p = Prio::from_bits(bits);
            prop_assert_eq!(p.apply_to(bits), bits);
        }
    }

    #[test]
    fn failed_attempt_after_one_unproven_boot() {
        // A proven on 1.1.0, B staged: prioritize gives B one try.
        let mut t = vec![e(3, 1, 0, true), e(4, 0, 0, false)];
        prioritize(&mut t, 4).unwrap();
        assert!(failed_attempts(&t, 3).is_empty(), "staged, not tried yet");
        // The boot takes the try; B is running and unproven: not a rollback.
        let c = select_for_boot(&mut t, &[]).unwrap();
        assert_eq!(c.number, 4);
        assert!(failed_attempts(&t, 4).is_empty());
        // B never got marked good: the next boot falls back to A.
        let c = select_for_boot(&mut t, &[]).unwrap();
        assert_eq!(c.number, 3);
        assert_eq!(failed_attempts(&t, 3), vec![4]);
        // A's own mark-good raises it above B; B still counts as failed.
        mark_good(&mut t, 3).unwrap();
        assert_eq!(failed_attempts(&t, 3), vec![4]);
        // Once handled (invalidated) it is gone.
        invalidate(&mut t, 4).unwrap();
        assert!(failed_attempts(&t, 3).is_empty());
        // A proven slot or one still holding tries is not a failure.
        let t = vec![e(3, 2, 0, true), e(4, 1, 0, true)];
        assert!(failed_attempts(&t, 3).is_empty());
        let t = vec![e(3, 1, 0, true), e(4, 2, 1, false)];
        assert!(failed_attempts(&t, 3).is_empty());
    }

    #[test]
    fn health_failure_falls_back_only_from_an_unproven_slot() {
        use HealthFailureAction::*;
        // B just booted with its one try spent; A proven.
        let t = vec![e(3, 1, 0, true), e(4, 2, 0, false)];
        assert_eq!(on_health_failure(&t, 4), FallBack(3));
        // A proven slot stays, whatever else is bootable.
        assert_eq!(on_health_failure(&t, 3), StayProven);
        // Nothing to fall back to (the other slot was invalidated).
        let t = vec![e(3, 0, 0, false), e(4, 2, 0, false)];
        assert_eq!(on_health_failure(&t, 4), NoFallback);
    }
}
