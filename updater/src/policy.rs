//! When a staged update may reboot the host: the reboot strategy, the
//! maintenance window and the etcd lock, judged together. Pure: the clock,
//! the window and the lock state are inputs, so every combination is a
//! table row in the tests. (When to *download* is `choose`: rollout
//! position, pause, max_version. A host may download outside its window
//! and reboot only inside it.)

use chrono::{Datelike, Duration, NaiveDateTime, NaiveTime, Weekday};

/// The strategy as update.conf names it (the contract lives with the file).
pub use nimbus::updateconf::RebootStrategy as Strategy;

/// `REBOOT_WINDOW_START` + `REBOOT_WINDOW_LENGTH`, in the host's local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub day: Option<Weekday>,
    pub start: NaiveTime,
    pub length: Duration,
}

impl Window {
    pub fn parse(start: &str, length: &str) -> Result<Window, String> {
        nimbus::updateconf::check_window_start(start)
            .map_err(|e| format!("REBOOT_WINDOW_START={e}"))?;
        let secs = nimbus::updateconf::parse_duration(length)
            .map_err(|e| format!("REBOOT_WINDOW_LENGTH={e}"))?;
        let parts: Vec<&str> = start.split_whitespace().collect();
        let (day, time) = match parts.as_slice() {
            [t] => (None, *t),
            [d, t] => (
                Some(
                    d.parse::<Weekday>()
                        .map_err(|_| format!("REBOOT_WINDOW_START={start:?}: bad day"))?,
                ),
                *t,
            ),
            _ => {
                return Err(format!(
                    "REBOOT_WINDOW_START={start:?}: expected \"HH:MM\" or \"Day HH:MM\""
                ))
            }
        };
        let start_t = NaiveTime::parse_from_str(time, "%H:%M")
            .map_err(|e| format!("REBOOT_WINDOW_START={start:?}: {e}"))?;
        let period = if day.is_some() { 7 * 86400 } else { 86400 };
        if secs > period {
            return Err(format!(
                "REBOOT_WINDOW_LENGTH={length:?} is longer than the {} the window repeats in",
                if day.is_some() { "week" } else { "day" }
            ));
        }
        Ok(Window {
            day,
            start: start_t,
            length: Duration::seconds(secs as i64),
        })
    }

    /// Window starts around `now`: the previous one and the next one.
    fn starts_around(&self, now: NaiveDateTime) -> (NaiveDateTime, NaiveDateTime) {
        let today = now.date();
        let period = if self.day.is_some() { 7 } else { 1 };
        let mut s = match self.day {
            None => today.and_time(self.start),
            Some(d) => {
                let back =
                    (7 + today.weekday().num_days_from_monday() - d.num_days_from_monday()) % 7;
                (today - Duration::days(back as i64)).and_time(self.start)
            }
        };
        if s > now {
            s -= Duration::days(period);
        }
        (s, s + Duration::days(period))
    }

    pub fn contains(&self, now: NaiveDateTime) -> bool {
        let (prev, _) = self.starts_around(now);
        now < prev + self.length
    }

    /// The next moment the window opens (now, if it is open).
    pub fn next_open(&self, now: NaiveDateTime) -> NaiveDateTime {
        if self.contains(now) {
            return now;
        }
        self.starts_around(now).1
    }
}

/// What the etcd semaphore said, as far as the policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// Not consulted (strategy is not etcd-lock, or nothing is staged yet).
    NotAsked,
    /// This host holds a slot.
    Held,
    /// A slot is free.
    Free,
    /// All `max` slots are taken by these holders.
    Full { holders: Vec<String>, max: u64 },
    /// The lock's backend could not be asked; never reboot without the lock.
    Unavailable(String),
    /// The backend answered and gave no slot, saying why (a FleetLock
    /// server's error body).
    Refused(String),
    /// The backend answered that every slot is taken (a FleetLock server's
    /// 409 Conflict), with its words: the normal answer while other hosts
    /// reboot, asked again soon rather than backed off from.
    Taken(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is staged.
    Nothing,
    /// Reboot now.
    Reboot,
    /// Take a slot in the semaphore, then ask again.
    TakeLock,
    /// Not now: `until` when known, and why in plain words.
    Wait {
        until: Option<NaiveDateTime>,
        why: String,
    },
}

pub fn decide(
    staged: bool,
    strategy: Strategy,
    window: Option<&Window>,
    lock: &Lock,
    now: NaiveDateTime,
) -> Decision {
    if !staged {
        return Decision::Nothing;
    }
    if strategy == Strategy::Off {
        return Decision::Wait {
            until: None,
            why: "REBOOT_STRATEGY=off: reboot by hand to use the new version".into(),
        };
    }
    if let Some(w) = window {
        if !w.contains(now) {
            let at = w.next_open(now);
            return Decision::Wait {
                until: Some(at),
                why: format!(
                    "the reboot window opens at {}",
                    at.format("%a %Y-%m-%d %H:%M")
                ),
            };
        }
    }
    match strategy {
        Strategy::Reboot => Decision::Reboot,
        Strategy::Off => unreachable_off(),
        Strategy::EtcdLock | Strategy::FleetLock => match lock {
            Lock::Held => Decision::Reboot,
            Lock::Free | Lock::NotAsked => Decision::TakeLock,
            Lock::Full { holders, max } => Decision::Wait {
                until: None,
                why: format!(
                    "the reboot lock is held by {} (max {max})",
                    holders.join(", ")
                ),
            },
            Lock::Unavailable(e) => Decision::Wait {
                until: None,
                why: format!(
                    "cannot reach {} for the reboot lock ({e}); not rebooting without it",
                    if strategy == Strategy::FleetLock {
                        "the FleetLock server"
                    } else {
                        "etcd"
                    }
                ),
            },
            Lock::Refused(why) => Decision::Wait {
                until: None,
                why: format!("the reboot lock gave no slot: {why}"),
            },
            Lock::Taken(why) => Decision::Wait {
                until: None,
                why: format!("the reboot lock is taken by other hosts: {why}"),
            },
        },
    }
}

// `Off` returned above; kept as a function so the match stays exhaustive
// without a panic path.
fn unreachable_off() -> Decision {
    Decision::Wait {
        until: None,
        why: "REBOOT_STRATEGY=off".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").expect("time")
    }

    // 2026-11-26 is a Thursday.
    #[test]
    fn windows() {
        let daily = Window::parse("04:00", "1h30m").expect("daily");
        assert!(daily.contains(at("2026-11-26 04:00")));
        assert!(daily.contains(at("2026-11-26 05:29")));
        assert!(!daily.contains(at("2026-11-26 05:30")));
        assert!(!daily.contains(at("2026-11-26 03:59")));
        assert_eq!(
            daily.next_open(at("2026-11-26 06:00")),
            at("2026-11-27 04:00")
        );
        assert_eq!(
            daily.next_open(at("2026-11-26 03:00")),
            at("2026-11-26 04:00")
        );
        // Across midnight.
        let night = Window::parse("23:30", "1h").expect("night");
        assert!(night.contains(at("2026-11-27 00:15")));
        assert!(!night.contains(at("2026-11-27 00:30")));
        let weekly = Window::parse("Thu 04:00", "2h").expect("weekly");
        assert!(weekly.contains(at("2026-11-26 05:00")));
        assert!(!weekly.contains(at("2026-11-27 05:00")));
        assert_eq!(
            weekly.next_open(at("2026-11-27 05:00")),
            at("2026-12-03 04:00")
        );
        assert_eq!(
            weekly.next_open(at("2026-11-24 05:00")),
            at("2026-11-26 04:00")
        );
        // Sunday window seen from Monday.
        let sun = Window::parse("Sun 23:00", "3h").expect("sun");
        assert!(sun.contains(at("2026-11-30 01:00")));
    }

    #[test]
    fn bad_windows() {
        for (s, l) in [
            ("25:00", "1h"),
            ("Thu", "1h"),
            ("Fri 04:00", "8d"),
            ("04:00", "25h"),
            ("04:00", "soon"),
            ("Someday 04:00", "1h"),
        ] {
            assert!(Window::parse(s, l).is_err(), "{s} {l}");
        }
    }

    #[test]
    fn gates_alone_and_together() {
        let w = Window::parse("04:00", "1h").expect("w");
        let inside = at("2026-11-26 04:30");
        let outside = at("2026-11-26 12:00");
        let full = Lock::Full {
            holders: vec!["m1".into()],
            max: 1,
        };
        let down = Lock::Unavailable("connection refused".into());
        let refused = Lock::Refused("full (all 1 slot(s) are taken)".into());
        use Strategy::*;
        type Row<'a> = (
            bool,
            Strategy,
            Option<&'a Window>,
            &'a Lock,
            NaiveDateTime,
            &'a str,
        );
        let rows: Vec<Row> = vec![
            (false, Reboot, None, &Lock::NotAsked, outside, "nothing"),
            (false, EtcdLock, Some(&w), &Lock::Held, inside, "nothing"),
            (true, Reboot, None, &Lock::NotAsked, outside, "reboot"),
            (true, Reboot, Some(&w), &Lock::NotAsked, inside, "reboot"),
            (
                true,
                Reboot,
                Some(&w),
                &Lock::NotAsked,
                outside,
                "wait:window",
            ),
            (true, Off, None, &Lock::NotAsked, outside, "wait:off"),
            (true, Off, Some(&w), &Lock::Held, inside, "wait:off"),
            (true, EtcdLock, None, &Lock::NotAsked, outside, "take"),
            (true, EtcdLock, None, &Lock::Free, outside, "take"),
            (true, EtcdLock, None, &Lock::Held, outside, "reboot"),
            (true, EtcdLock, None, &full, outside, "wait:lock"),
            (true, EtcdLock, None, &down, outside, "wait:etcd"),
            (
                true,
                EtcdLock,
                Some(&w),
                &Lock::Free,
                outside,
                "wait:window",
            ),
            (
                true,
                EtcdLock,
                Some(&w),
                &Lock::Held,
                outside,
                "wait:window",
            ),
            (true, EtcdLock, Some(&w), &Lock::Free, inside, "take"),
            (true, EtcdLock, Some(&w), &Lock::Held, inside, "reboot"),
            (true, EtcdLock, Some(&w), &full, inside, "wait:lock"),
            (true, EtcdLock, Some(&w), &down, inside, "wait:etcd"),
            (true, FleetLock, None, &Lock::Free, outside, "take"),
            (true, FleetLock, None, &Lock::Held, outside, "reboot"),
            (true, FleetLock, None, &down, outside, "wait:fleetlock"),
            (true, FleetLock, None, &refused, outside, "wait:refused"),
            (
                true,
                FleetLock,
                Some(&w),
                &Lock::Held,
                outside,
                "wait:window",
            ),
        ];
        for (staged, strat, win, lock, now, want) in rows {
            let d = decide(staged, strat, win, lock, now);
            let got = match &d {
                Decision::Nothing => "nothing".to_string(),
                Decision::Reboot => "reboot".into(),
                Decision::TakeLock => "take".into(),
                Decision::Wait { why, until } => {
                    let tag = if why.contains("window") {
                        assert!(until.is_some());
                        "window"
                    } else if why.contains("off") {
                        "off"
                    } else if why.contains("held by") {
                        "lock"
                    } else if why.contains("etcd") {
                        "etcd"
                    } else if why.contains("the FleetLock server") {
                        "fleetlock"
                    } else if why.contains("gave no slot: full") {
                        "refused"
                    } else {
                        "?"
                    };
                    format!("wait:{tag}")
                }
            };
            assert_eq!(
                got, want,
                "{staged} {strat:?} {win:?} {lock:?} {now}: {d:?}"
            );
        }
    }

    /// The engine's two gates in sequence, as `check` and `reboot_step` run
    /// them: the rollout decides whether to download, then strategy, window
    /// and lock decide whether to reboot.
    #[test]
    fn rollout_window_and_lock_together() {
        use crate::choose::{choose, Choice};
        use chrono::TimeZone;
        let start = chrono::Utc
            .with_ymd_and_hms(2026, 11, 26, 0, 0, 0)
            .single()
            .expect("time");
        let release = |paused| nimbus::release::Release {
            version: "1.1.0".parse().expect("v"),
            payload: "payloads/1.1.0/usr.img.zst".into(),
            compressed_size: 1,
            compressed_sha256: "0".repeat(64),
            raw_size: 8192,
            raw_sha256: "0".repeat(64),
            verity_root: "0".repeat(64),
            rollout: Some(nimbus::release::Rollout {
                start,
                duration_secs: 10 * 3600,
                paused,
            }),
            stage1: None,
            delta: None,
        };
        let manifest = |paused| nimbus::release::Manifest {
            schema: 1,
            channel: "stable".into(),
            serial: 1,
            issued: start,
            expires: start + Duration::days(7),
            max_version: None,
            releases: vec![release(paused)],
        };
        let running: semver::Version = "1.0.0".parse().expect("v");
        let w = Window::parse("04:00", "2h").expect("w");
        let full = Lock::Full {
            holders: vec!["m9".into()],
            max: 1,
        };
        let down = Lock::Unavailable("down".into());
        // (seed, paused, hour of day, lock, expected)
        let rows: Vec<(f64, bool, u32, &Lock, &str)> = vec![
            (0.9, false, 5, &Lock::Free, "wait:rollout"), // position 0.9 starts at 09:00
            (0.1, true, 5, &Lock::Free, "nothing:paused"),
            (0.1, false, 2, &Lock::Free, "download,wait:window"), // 02:00: may download, not reboot
            (0.1, false, 5, &Lock::Free, "download,take"),
            (0.1, false, 5, &full, "download,wait:lock"),
            (0.1, false, 5, &down, "download,wait:etcd"),
            (0.3, false, 5, &Lock::Held, "download,reboot"), // 0.3 starts at 03:00
            (0.5, false, 5, &Lock::Held, "download,reboot"), // 0.5 starts exactly at 05:00
            (0.51, false, 5, &Lock::Held, "wait:rollout"),
        ];
        for (seed, paused, hour, lock, want) in rows {
            let now_utc = start + Duration::hours(hour as i64);
            let now_local = now_utc.naive_utc();
            let got = match choose(&manifest(paused), &running, seed, now_utc, false) {
                Choice::Wait { .. } => "wait:rollout".to_string(),
                Choice::Nothing(why) if why.contains("paused") => "nothing:paused".into(),
                Choice::Nothing(why) => format!("nothing:{why}"),
                Choice::Offer(_) => {
                    let d = decide(true, Strategy::EtcdLock, Some(&w), lock, now_local);
                    let r = match d {
                        Decision::Reboot => "reboot".to_string(),
                        Decision::TakeLock => "take".into(),
                        Decision::Nothing => "nothing".into(),
                        Decision::Wait { why, .. } if why.contains("window") => {
                            "wait:window".into()
                        }
                        Decision::Wait { why, .. } if why.contains("held by") => "wait:lock".into(),
                        Decision::Wait { why, .. } if why.contains("etcd") => "wait:etcd".into(),
                        Decision::Wait { why, .. } => format!("wait:{why}"),
                    };
                    format!("download,{r}")
                }
            };
            assert_eq!(got, want, "seed {seed} paused {paused} {hour}:00 {lock:?}");
        }
    }
}
