//! Which release a host takes from a verified manifest. Pure: the clock,
//! the running version and the host's rollout seed are inputs.

use chrono::{DateTime, Utc};
use nimbus::release::{Manifest, Release};
use semver::Version;

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// Install this release.
    Offer(Release),
    /// Nothing to do, and why.
    Nothing(String),
    /// A newer release exists but this host's turn has not come.
    Wait {
        until: DateTime<Utc>,
        reason: String,
    },
}

/// When a host at `seed` in [0, 1) may start a staged release.
pub fn rollout_start(r: &Release, seed: f64) -> Option<DateTime<Utc>> {
    let ro = r.rollout.as_ref()?;
    // Bounded by Manifest::validate; checked anyway, since a panic here
    // would stop the engine on every check.
    let secs = ro.duration_secs.min(nimbus::release::MAX_ROLLOUT_SECS);
    let offset = (seed.clamp(0.0, 1.0) * secs as f64) as i64;
    ro.start
        .checked_add_signed(chrono::Duration::try_seconds(offset)?)
        .or(Some(DateTime::<Utc>::MAX_UTC))
}

/// The newest release this host may install now. Above `running` only,
/// unless `allow_downgrade` (the operator switched to a channel that is
/// behind and said so), in which case the channel's newest is taken even
/// if it is older.
pub fn choose(
    m: &Manifest,
    running: &Version,
    seed: f64,
    now: DateTime<Utc>,
    allow_downgrade: bool,
) -> Choice {
    choose_excluding(m, running, seed, now, allow_downgrade, &[])
}

/// [`choose`], never offering a version in `failed` (it rolled back on this
/// host): an older release between it and the running one, or a newer
/// one, is still taken.
pub fn choose_excluding(
    m: &Manifest,
    running: &Version,
    seed: f64,
    now: DateTime<Utc>,
    allow_downgrade: bool,
    failed: &[Version],
) -> Choice {
    let mut offered: Vec<&Release> = m
        .releases
        .iter()
        .filter(|r| m.max_version.as_ref().is_none_or(|max| r.version <= *max))
        .collect();
    offered.sort_by(|a, b| b.version.cmp(&a.version));
    let Some(newest) = offered.first().map(|r| r.version.clone()) else {
        return Choice::Nothing(match &m.max_version {
            Some(max) => format!(
                "channel {} offers nothing at or below max_version {max}",
                m.channel
            ),
            None => format!("channel {} offers no releases", m.channel),
        });
    };
    if newest == *running {
        return Choice::Nothing(format!("{running} is the newest on channel {}", m.channel));
    }
    if newest < *running && !allow_downgrade {
        return Choice::Nothing(format!(
            "channel {} offers {newest} at most, older than the running {running}; not downgrading",
            m.channel
        ));
    }
    let mut skipped: Vec<String> = Vec::new();
    for r in offered {
        if r.version < *running && !allow_downgrade {
            break;
        }
        if r.version == *running {
            break;
        }
        if failed.contains(&r.version) {
            skipped.push(r.version.to_string());
            continue;
        }
        match &r.rollout {
            Some(ro) if ro.paused => continue,
            Some(_) => {
                let at = rollout_start(r, seed).unwrap_or(now);
                if now < at {
                    return Choice::Wait {
                        until: at,
                        reason: format!(
                            "{} is rolling out; this host's position {seed:.2} starts at {}",
                            r.version,
                            at.to_rfc3339()
                        ),
                    };
                }
                return Choice::Offer(r.clone());
            }
            None => return Choice::Offer(r.clone()),
        }
    }
    if !skipped.is_empty() {
        return Choice::Nothing(format!(
            "{} rolled back on this host before and is not installed again; waiting for a newer release on channel {}",
            skipped.join(", "),
            m.channel
        ));
    }
    Choice::Nothing(format!(
        "the rollout of {newest} on channel {} is paused",
        m.channel
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus::release::Rollout;

    fn rel(v: &str, rollout: Option<Rollout>) -> Release {
        Release {
            version: v.parse().expect("version"),
            payload: format!("payloads/{v}/usr.img.zst"),
            compressed_size: 1,
            compressed_sha256: "0".repeat(64),
            raw_size: 8192,
            raw_sha256: "0".repeat(64),
            verity_root: "0".repeat(64),
            rollout,
            stage1: None,
            delta: None,
        }
    }

    fn manifest(releases: Vec<Release>, max: Option<&str>) -> Manifest {
        let now = Utc::now();
        Manifest {
            schema: 1,
            channel: "stable".into(),
            serial: 1,
            issued: now,
            expires: now + chrono::Duration::days(1),
            max_version: max.map(|m| m.parse().expect("max")),
            releases,
        }
    }

    fn v(s: &str) -> Version {
        s.parse().expect("version")
    }

    #[test]
    fn a_huge_rollout_or_start_does_not_panic() {
        for (start, secs) in [
            (Utc::now(), u64::MAX),
            (
                DateTime::<Utc>::MAX_UTC - chrono::Duration::days(1),
                86400 * 30,
            ),
        ] {
            let ro = Rollout {
                start,
                duration_secs: secs,
                paused: false,
            };
            let m = manifest(vec![rel("1.1.0", Some(ro))], None);
            let c = choose(&m, &v("1.0.0"), 0.99, Utc::now(), false);
            assert!(matches!(c, Choice::Wait { .. }), "{c:?}");
        }
    }

    #[test]
    fn newest_above_running() {
        let m = manifest(
            vec![rel("1.0.0", None), rel("1.2.0", None), rel("1.1.0", None)],
            None,
        );
        let now = Utc::now();
        assert!(
            matches!(choose(&m, &v("1.0.0"), 0.5, now, false), Choice::Offer(r) if r.version == v("1.2.0"))
        );
        assert!(matches!(
            choose(&m, &v("1.2.0"), 0.5, now, false),
            Choice::Nothing(_)
        ));
        assert!(matches!(
            choose(&m, &v("2.0.0"), 0.5, now, false),
            Choice::Nothing(_)
        ));
        assert!(
            matches!(choose(&m, &v("2.0.0"), 0.5, now, true), Choice::Offer(r) if r.version == v("1.2.0"))
        );
    }

    #[test]
    fn max_version_caps_the_offer() {
        let m = manifest(vec![rel("1.1.0", None), rel("1.2.0", None)], Some("1.1.0"));
        let now = Utc::now();
        assert!(
            matches!(choose(&m, &v("1.0.0"), 0.0, now, false), Choice::Offer(r) if r.version == v("1.1.0"))
        );
        assert!(matches!(
            choose(&m, &v("1.1.0"), 0.0, now, false),
            Choice::Nothing(_)
        ));
    }

    #[test]
    fn rollout_position_and_pause() {
        let now = Utc::now();
        let ro = |paused| Rollout {
            start: now - chrono::Duration::hours(1),
            duration_secs: 4 * 3600,
            paused,
        };
        let m = manifest(
            vec![rel("1.1.0", None), rel("1.2.0", Some(ro(false)))],
            None,
        );
        assert!(
            matches!(choose(&m, &v("1.0.0"), 0.1, now, false), Choice::Offer(r) if r.version == v("1.2.0"))
        );
        match choose(&m, &v("1.0.0"), 0.9, now, false) {
            Choice::Wait { until, .. } => assert!(until > now + chrono::Duration::hours(2)),
            other => panic!("{other:?}"),
        }
        // Paused: the next release down is offered instead.
        let m = manifest(vec![rel("1.1.0", None), rel("1.2.0", Some(ro(true)))], None);
        assert!(
            matches!(choose(&m, &v("1.0.0"), 0.1, now, false), Choice::Offer(r) if r.version == v("1.1.0"))
        );
        let m = manifest(vec![rel("1.2.0", Some(ro(true)))], None);
        assert!(
            matches!(choose(&m, &v("1.0.0"), 0.1, now, false), Choice::Nothing(s) if s.contains("paused"))
        );
    }

    #[test]
    fn failed_versions_are_skipped_not_newer_ones() {
        let now = Utc::now();
        let m = manifest(vec![rel("1.1.0", None), rel("1.2.0", None)], None);
        let failed = [v("1.2.0")];
        assert!(
            matches!(choose_excluding(&m, &v("1.0.0"), 0.5, now, false, &failed), Choice::Offer(r) if r.version == v("1.1.0"))
        );
        match choose_excluding(&m, &v("1.1.0"), 0.5, now, false, &failed) {
            Choice::Nothing(why) => assert!(why.contains("1.2.0 rolled back"), "{why}"),
            c => panic!("{c:?}"),
        }
        let m = manifest(vec![rel("1.2.0", None), rel("1.3.0", None)], None);
        assert!(
            matches!(choose_excluding(&m, &v("1.1.0"), 0.5, now, false, &failed), Choice::Offer(r) if r.version == v("1.3.0"))
        );
    }
}
