//! update.conf as the engine uses it: the layered file parsed and every
//! value checked, each error naming the key and the file.

use std::path::Path;

use nimbus::updateconf::{self, UpdateConf};

use crate::error::UpdateError;

/// Applied when update.conf sets no IO_WRITE_BPS: 1 GiB in about a
/// minute. Measured (docs/bench-impact.md): a workload's p99 latency under
/// a capped update stays at its idle value at 16 MB/s and doubles at 64.
pub const DEFAULT_WRITE_BPS: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub group: String,
    /// Repository base URL without a trailing slash; `None` = disabled.
    pub server: Option<String>,
    /// Write-bandwidth cap for the slot writer; `None` = unlimited.
    pub write_bps: Option<u64>,
    /// Run the writer in the idle I/O priority class.
    pub io_idle: bool,
    /// Download-rate cap (bytes per second) for payloads and delta frames;
    /// `None` = unlimited (the default, as on Flatcar).
    pub download_bps: Option<u64>,
    pub strategy: crate::policy::Strategy,
    pub window: Option<crate::policy::Window>,
    pub etcd: nimbus_etcd::EtcdOptions,
    /// How long each pre-reboot or post-good hook may run.
    pub hook_timeout: std::time::Duration,
    /// FLEETLOCK_URL and FLEETLOCK_GROUP (`None` without a URL).
    pub fleetlock: Option<crate::fleetlock::FleetLockConfig>,
}

/// "64M", "10MB", "500K", "0" (unlimited), "unlimited" -> bytes per second.
pub fn parse_bps(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") || t == "0" {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected bytes per second such as 64M, 500K or unlimited"))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .map(Some)
        .ok_or_else(|| format!("{s:?} overflows"))
}

impl EngineConfig {
    /// The limits an install runs under.
    pub fn limits(&self) -> crate::writer::Limits {
        crate::writer::Limits {
            write_bps: self.write_bps,
            io_idle: self.io_idle,
            download_bps: self.download_bps,
        }
    }

    pub fn load(root: &Path) -> Result<EngineConfig, UpdateError> {
        let where_ = root.join(updateconf::ETC_PATH);
        let conf = UpdateConf::load_layered(root).map_err(|e| UpdateError::Config {
            path: where_.clone(),
            reason: e.to_string(),
        })?;
        EngineConfig::from_conf(&conf).map_err(|reason| UpdateError::Config {
            path: where_,
            reason,
        })
    }

    pub fn from_conf(c: &UpdateConf) -> Result<EngineConfig, String> {
        let group = c.get("GROUP").unwrap_or("stable").to_string();
        if !nimbus::release::valid_channel_name(&group) {
            return Err(format!(
                "GROUP={group:?}: a channel name is [a-z0-9._-]{{1,64}}"
            ));
        }
        let server = match c.get("SERVER") {
            None => return Err("SERVER is not set (a repository URL, or `disabled`)".into()),
            Some("disabled") => None,
            Some(s) => {
                let u = reqwest::Url::parse(s).map_err(|e| format!("SERVER={s:?}: {e}"))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(format!("SERVER={s:?}: only http and https are supported"));
                }
                Some(s.trim_end_matches('/').to_string())
            }
        };
        let strategy = match c.get("REBOOT_STRATEGY") {
            None => crate::policy::Strategy::default(),
            Some(s) => s.parse().map_err(|e| format!("REBOOT_STRATEGY={e}"))?,
        };
        let write_bps = match c.get("IO_WRITE_BPS") {
            None => Some(DEFAULT_WRITE_BPS),
            Some(v) => parse_bps(v).map_err(|e| format!("IO_WRITE_BPS={e}"))?,
        };
        let io_idle = match c.get("IO_CLASS").unwrap_or("idle") {
            "idle" => true,
            "best-effort" => false,
            other => return Err(format!("IO_CLASS={other:?}: use idle or best-effort")),
        };
        let download_bps = match c.get("DOWNLOAD_RATE_MAX") {
            None => None,
            Some(v) => parse_bps(v).map_err(|e| format!("DOWNLOAD_RATE_MAX={e}"))?,
        };
        let window = match (c.get("REBOOT_WINDOW_START"), c.get("REBOOT_WINDOW_LENGTH")) {
            (Some(st), Some(len)) => Some(crate::policy::Window::parse(st, len)?),
            (None, None) => None,
            (Some(_), None) => {
                return Err("REBOOT_WINDOW_START is set without REBOOT_WINDOW_LENGTH".into())
            }
            (None, Some(_)) => {
                return Err("REBOOT_WINDOW_LENGTH is set without REBOOT_WINDOW_START".into())
            }
        };
        let etcd = nimbus_etcd::options_from_conf(c)?;
        let hook_timeout = match c.get("HOOK_TIMEOUT") {
            None => crate::hooks::DEFAULT_TIMEOUT,
            Some(v) => match updateconf::parse_hook_timeout(v) {
                Ok(s) => std::time::Duration::from_secs(s),
                Err(e) => return Err(format!("HOOK_TIMEOUT={e}")),
            },
        };
        let fleetlock = match c.get("FLEETLOCK_URL") {
            None => None,
            Some(u) => {
                updateconf::check_fleetlock_url(u).map_err(|e| format!("FLEETLOCK_URL={e}"))?;
                reqwest::Url::parse(u).map_err(|e| format!("FLEETLOCK_URL={u:?}: {e}"))?;
                let group = c
                    .get("FLEETLOCK_GROUP")
                    .unwrap_or(nimbus::fleetlock::DEFAULT_GROUP)
                    .to_string();
                updateconf::check_fleetlock_group(&group)
                    .map_err(|e| format!("FLEETLOCK_GROUP={e}"))?;
                Some(crate::fleetlock::FleetLockConfig {
                    url: u.trim_end_matches('/').to_string(),
                    group,
                })
            }
        };
        if c.get("FLEETLOCK_GROUP").is_some() && fleetlock.is_none() {
            return Err("FLEETLOCK_GROUP is set without FLEETLOCK_URL".into());
        }
        if strategy == crate::policy::Strategy::FleetLock && fleetlock.is_none() {
            return Err(
                "REBOOT_STRATEGY=fleetlock needs FLEETLOCK_URL (the FleetLock server's base URL)"
                    .into(),
            );
        }
        Ok(EngineConfig {
            fleetlock,
            group,
            server,
            write_bps,
            io_idle,
            download_bps,
            strategy,
            window,
            etcd,
            hook_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(s: &str) -> Result<EngineConfig, String> {
        EngineConfig::from_conf(&UpdateConf::parse(s).expect("parse"))
    }

    #[test]
    fn values() {
        let c =
            conf("GROUP=beta\nSERVER=http://127.0.0.1:8080/repo/\nIO_WRITE_BPS=10M\n").expect("ok");
        assert_eq!(c.group, "beta");
        assert_eq!(c.server.as_deref(), Some("http://127.0.0.1:8080/repo"));
        assert_eq!(c.write_bps, Some(10 << 20));
        assert!(c.io_idle);
        assert_eq!(c.strategy, crate::policy::Strategy::Reboot);
        assert_eq!(conf("SERVER=disabled\n").expect("ok").server, None);
        let f =
            conf("SERVER=disabled\nREBOOT_STRATEGY=fleetlock\nFLEETLOCK_URL=http://lock:3333/\n")
                .expect("ok");
        assert_eq!(
            f.fleetlock,
            Some(crate::fleetlock::FleetLockConfig {
                url: "http://lock:3333".into(),
                group: "default".into()
            })
        );
        assert_eq!(
            conf("SERVER=http://x\nIO_WRITE_BPS=0")
                .expect("ok")
                .write_bps,
            None
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("GROUP=Beta!\nSERVER=http://x", "GROUP"),
            ("GROUP=beta", "SERVER"),
            ("SERVER=ftp://x", "SERVER"),
            ("SERVER=not a url", "SERVER"),
            (
                "SERVER=http://x\nREBOOT_STRATEGY=sometimes",
                "REBOOT_STRATEGY",
            ),
            ("SERVER=http://x\nIO_WRITE_BPS=fast", "IO_WRITE_BPS"),
            ("SERVER=http://x\nIO_WRITE_BPS=10X", "IO_WRITE_BPS"),
            ("SERVER=http://x\nDOWNLOAD_RATE_MAX=1Q", "DOWNLOAD_RATE_MAX"),
            ("SERVER=http://x\nIO_CLASS=realtime", "IO_CLASS"),
            (
                "SERVER=http://x\nREBOOT_WINDOW_START=Fri 25:00\nREBOOT_WINDOW_LENGTH=1h",
                "REBOOT_WINDOW_START",
            ),
            (
                "SERVER=http://x\nREBOOT_WINDOW_START=04:00\nREBOOT_WINDOW_LENGTH=soon",
                "REBOOT_WINDOW_LENGTH",
            ),
            (
                "SERVER=http://x\nREBOOT_WINDOW_START=04:00",
                "REBOOT_WINDOW_START",
            ),
            ("SERVER=http://x\nETCD_ENDPOINTS=ftp://e", "ETCD_ENDPOINTS"),
            ("SERVER=http://x\nETCD_ENDPOINTS=,", "ETCD_ENDPOINTS"),
            ("SERVER=http://x\nETCD_CERTFILE=/c", "ETCD_CERTFILE"),
            ("SERVER=http://x\nETCD_USERNAME=u", "ETCD_USERNAME"),
            ("SERVER=http://x\nREBOOT_GROUP=A B", "REBOOT_GROUP"),
            (
                "SERVER=http://x\nREBOOT_STRATEGY=fleetlock",
                "REBOOT_STRATEGY",
            ),
            ("SERVER=http://x\nFLEETLOCK_URL=ftp://f", "FLEETLOCK_URL"),
            (
                "SERVER=http://x\nFLEETLOCK_URL=http://u:p@f",
                "FLEETLOCK_URL",
            ),
            (
                "SERVER=http://x\nFLEETLOCK_URL=http://f?x=1",
                "FLEETLOCK_URL",
            ),
            (
                "SERVER=http://x\nFLEETLOCK_URL=http://f\nFLEETLOCK_GROUP=a/b",
                "FLEETLOCK_GROUP",
            ),
            ("SERVER=http://x\nFLEETLOCK_GROUP=g", "FLEETLOCK_GROUP"),
        ] {
            let e = conf(text).expect_err(text);
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }
}
