//! `update.conf`: Flatcar-compatible `KEY=value` host configuration
//! (docs/update-engine.md, "Configuration"). `/etc/nimbus/update.conf` overrides
//! `/usr/share/nimbus/update.conf` key by key.
//!
//! Edits keep every other line (comments, unknown keys, order) as the
//! operator wrote them, and are written with [`crate::durable::write_atomic`].

use std::path::Path;

pub const ETC_PATH: &str = crate::paths::UPDATE_CONF_ETC;
pub const USR_PATH: &str = crate::paths::UPDATE_CONF_USR;

/// The keys Nimbus reads. Flatcar's names first, then Nimbus's own.
pub const KNOWN_KEYS: &[&str] = &[
    "GROUP",
    "SERVER",
    "REBOOT_STRATEGY",
    "REBOOT_WINDOW_START",
    "REBOOT_WINDOW_LENGTH",
    "REBOOT_GROUP",
    "ETCD_ENDPOINTS",
    "ETCD_CAFILE",
    "ETCD_CERTFILE",
    "ETCD_KEYFILE",
    "ETCD_USERNAME",
    "ETCD_PASSWORD",
    "IO_WRITE_BPS",
    "IO_CLASS",
    "DOWNLOAD_RATE_MAX",
    "HOOK_TIMEOUT",
    "FLEETLOCK_URL",
    "FLEETLOCK_GROUP",
];

/// `REBOOT_STRATEGY`: how a host that staged an update gets to reboot.
/// Read by update-engine, written by cloud-config's `coreos.update`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RebootStrategy {
    /// Reboot as soon as an update is staged (and the window allows).
    #[default]
    Reboot,
    /// Take a slot of the etcd reboot semaphore first (locksmith's).
    EtcdLock,
    /// Never reboot by itself: say so in /run/reboot-required.
    Off,
    /// Take a slot from a FleetLock server first (Zincati's protocol,
    /// `crate::fleetlock`; FLEETLOCK_URL, FLEETLOCK_GROUP).
    FleetLock,
}

impl RebootStrategy {
    pub const ALL: [RebootStrategy; 4] = [Self::Reboot, Self::EtcdLock, Self::Off, Self::FleetLock];
    /// Every accepted name, in [`Self::ALL`]'s order, for hints.
    pub const NAMES: [&'static str; 4] = ["reboot", "etcd-lock", "off", "fleetlock"];

    /// Whether a reboot waits for a slot of a cluster-wide lock.
    pub fn uses_lock(self) -> bool {
        matches!(self, Self::EtcdLock | Self::FleetLock)
    }

    /// The name in update.conf.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

impl std::fmt::Display for RebootStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RebootStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("{s:?} is not one of {}", Self::NAMES.join(", ")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    #[error("line {line}: expected KEY=value, found {text:?}")]
    Syntax { line: usize, text: String },
    #[error("{key}: {reason}")]
    Value { key: String, reason: String },
}

/// The file as lines, so edits can keep what they do not touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateConf {
    lines: Vec<String>,
}

fn split(line: &str) -> Option<(&str, &str)> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let (k, v) = t.split_once('=')?;
    Some((k.trim(), v.trim()))
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

impl UpdateConf {
    pub fn parse(text: &str) -> Result<UpdateConf, ConfError> {
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            match split(line) {
                Some((k, _))
                    if !k.is_empty()
                        && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') => {}
                _ => {
                    return Err(ConfError::Syntax {
                        line: i + 1,
                        text: line.to_string(),
                    })
                }
            }
        }
        Ok(UpdateConf {
            lines: text.lines().map(str::to_string).collect(),
        })
    }

    /// The last assignment of `key` wins, as in a shell-sourced file.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .filter_map(|l| split(l))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| unquote(v))
            .next_back()
    }

    /// Set `key`: replace its last assignment in place, drop earlier ones,
    /// or append.
    pub fn set(&mut self, key: &str, value: &str) {
        let idx: Vec<usize> = self
            .lines
            .iter()
            .enumerate()
            .filter(|(_, l)| split(l).is_some_and(|(k, _)| k == key))
            .map(|(i, _)| i)
            .collect();
        let new = format!("{key}={value}");
        match idx.split_last() {
            Some((&last, earlier)) => {
                self.lines[last] = new;
                for &i in earlier.iter().rev() {
                    self.lines.remove(i);
                }
            }
            None => self.lines.push(new),
        }
    }

    /// The mode a new update.conf with this content gets: 0600 when it
    /// holds a credential (the etcd password), else 0644. A file that
    /// exists keeps its own mode (`durable::write_atomic_keep_mode`).
    pub fn new_file_mode(&self) -> u32 {
        if self.get("ETCD_PASSWORD").is_some() {
            0o600
        } else {
            0o644
        }
    }

    pub fn keys(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| split(l))
            .map(|(k, _)| k)
            .collect()
    }

    pub fn render(&self) -> String {
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }

    /// `/etc` over `/usr` under `root`: the effective settings.
    pub fn load_layered(root: &Path) -> Result<UpdateConf, ConfError> {
        let mut out = UpdateConf::default();
        for rel in [USR_PATH, ETC_PATH] {
            if let Ok(text) = std::fs::read_to_string(root.join(rel)) {
                let c = UpdateConf::parse(&text)?;
                out.lines.extend(c.lines);
            }
        }
        Ok(out)
    }
}

/// `FLEETLOCK_URL`: the server's base URL, http or https, with a host and
/// without query, fragment or credentials (a FleetLock server takes none).
pub fn check_fleetlock_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("{s:?}: a FleetLock URL starts with http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{s:?}: no host"));
    }
    if host.contains('@') {
        return Err(format!("{s:?}: credentials in the URL are not supported"));
    }
    if s.contains(|c: char| c.is_whitespace() || c == '?' || c == '#') {
        return Err(format!(
            "{s:?}: a base URL without blanks, query or fragment"
        ));
    }
    Ok(())
}

/// `FLEETLOCK_GROUP`: `[a-zA-Z0-9.-]+`.
pub fn check_fleetlock_group(s: &str) -> Result<(), String> {
    if crate::fleetlock::group_ok(s) {
        Ok(())
    } else {
        Err(format!(
            "{s:?}: a FleetLock group is 1 to {} of [a-zA-Z0-9.-]",
            crate::fleetlock::MAX_GROUP_LEN
        ))
    }
}

/// "04:00" or "Thu 04:00" (Flatcar/locksmith window start).
pub fn check_window_start(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let time = match parts.as_slice() {
        [t] => t,
        [day, t] => {
            const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
            if !DAYS.contains(&day.to_ascii_lowercase().as_str()) {
                return Err(format!("{s:?}: day {day:?} is not one of Mon..Sun"));
            }
            t
        }
        _ => return Err(format!("{s:?}: expected \"HH:MM\" or \"Day HH:MM\"")),
    };
    let (h, m) = time
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: time {time:?} is not HH:MM"))?;
    let valid = h.parse::<u8>().is_ok_and(|h| h < 24)
        && m.len() == 2
        && m.parse::<u8>().is_ok_and(|m| m < 60);
    if valid {
        Ok(())
    } else {
        Err(format!("{s:?}: time {time:?} is not a valid HH:MM"))
    }
}

/// The longest HOOK_TIMEOUT: a day. A drain that needs longer is stuck,
/// and deadlines computed from the value stay far from any overflow.
pub const MAX_HOOK_TIMEOUT_SECS: u64 = 86_400;

/// `HOOK_TIMEOUT` (and cloud-config's `nimbus.hook_timeout`): a duration
/// of more than 0 and at most [`MAX_HOOK_TIMEOUT_SECS`]. Returns seconds.
pub fn parse_hook_timeout(s: &str) -> Result<u64, String> {
    match parse_duration(s)? {
        0 => Err(format!("{s:?}: must be more than 0")),
        n if n > MAX_HOOK_TIMEOUT_SECS => Err(format!(
            "{s:?}: at most {MAX_HOOK_TIMEOUT_SECS} s (24h); a hook that runs longer is stuck"
        )),
        n => Ok(n),
    }
}

/// A Go-style duration: "1h30m", "45m", "90s", plus days ("14d"). Returns seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => {
                return Err(format!(
                    "{s:?}: unexpected {c:?} (use d, h, m, s, e.g. 1h30m)"
                ))
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: a unit must follow a number"))?;
        total = n
            .checked_mul(mult)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| format!("{s:?}: too long"))?;
        num.clear();
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(format!("{s:?}: expected a duration such as 1h30m"));
    }
    if total == 0 {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reboot_strategy_names_round_trip() {
        for (v, n) in RebootStrategy::ALL.iter().zip(RebootStrategy::NAMES) {
            assert_eq!(v.name(), n);
            assert_eq!(n.parse::<RebootStrategy>(), Ok(*v));
        }
        let e = "best-effort".parse::<RebootStrategy>().unwrap_err();
        assert_eq!(
            e,
            "\"best-effort\" is not one of reboot, etcd-lock, off, fleetlock"
        );
    }

    #[test]
    fn edit_keeps_other_lines() {
        let mut c =
            UpdateConf::parse("# comment\nGROUP=stable\nSERVER=\"https://u\"\nGROUP=beta\n")
                .unwrap();
        assert_eq!(c.get("GROUP"), Some("beta"));
        assert_eq!(c.get("SERVER"), Some("https://u"));
        c.set("GROUP", "alpha");
        assert_eq!(c.render(), "# comment\nSERVER=\"https://u\"\nGROUP=alpha\n");
        c.set("REBOOT_STRATEGY", "off");
        assert!(c.render().ends_with("REBOOT_STRATEGY=off\n"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        assert_eq!(
            UpdateConf::parse("GROUP=a\nnonsense\n"),
            Err(ConfError::Syntax {
                line: 2,
                text: "nonsense".into()
            })
        );
    }

    #[test]
    fn windows_and_durations() {
        check_window_start("04:00").unwrap();
        check_window_start("Thu 23:59").unwrap();
        assert!(check_window_start("Thx 04:00").is_err());
        assert!(check_window_start("24:00").is_err());
        assert!(check_window_start("4").is_err());
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("0m").is_err());
    }

    #[test]
    fn a_hook_timeout_is_positive_and_at_most_a_day() {
        assert_eq!(parse_hook_timeout("90s"), Ok(90));
        assert_eq!(parse_hook_timeout("24h"), Ok(86_400));
        for bad in ["0s", "25h", "2d", "99999999999999999d", "x"] {
            assert!(parse_hook_timeout(bad).is_err(), "{bad}");
        }
    }
}
