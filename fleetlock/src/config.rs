//! The server's configuration, in airlock's TOML shape so an operator's
//! file carries over (`[service]`, `[etcd3]`, `[lock]` with its groups),
//! with etcd's TLS files added. Every value is checked; errors name the
//! key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    service: Service,
    etcd3: Etcd3,
    #[serde(default)]
    lock: LockSection,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    address: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Etcd3 {
    endpoints: Vec<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LockSection {
    #[serde(default = "default_group")]
    default_group_name: String,
    #[serde(default = "one")]
    default_slots: u64,
    #[serde(default)]
    groups: Vec<GroupConf>,
}

impl Default for LockSection {
    fn default() -> Self {
        LockSection {
            default_group_name: default_group(),
            default_slots: 1,
            groups: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupConf {
    name: String,
    slots: u64,
}

fn default_group() -> String {
    nimbus::fleetlock::DEFAULT_GROUP.to_string()
}

fn one() -> u64 {
    1
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: String,
    pub etcd: nimbus_etcd::EtcdOptions,
    /// Slots by group; only these groups are served.
    pub groups: BTreeMap<String, u64>,
}

/// The most slots a group may have: more hosts than a fleet has rebooting
/// at once is a typo.
pub const MAX_SLOTS: u64 = 10_000;

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if f.service.address.parse::<std::net::IpAddr>().is_err() {
            return Err(format!(
                "service.address {:?}: an IP address to listen on",
                f.service.address
            ));
        }
        let listen = match f.service.address.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(a)) => format!("[{a}]:{}", f.service.port),
            _ => format!("{}:{}", f.service.address, f.service.port),
        };
        if f.etcd3.endpoints.is_empty() {
            return Err("etcd3.endpoints is empty".into());
        }
        for e in &f.etcd3.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!("etcd3.endpoints: {e:?} is not an http(s) URL"));
            }
        }
        if f.etcd3.cert_file.is_some() != f.etcd3.key_file.is_some() {
            return Err("etcd3.cert_file and etcd3.key_file go together".into());
        }
        let mut groups = BTreeMap::new();
        let mut add = |name: &str, slots: u64, key: &str| -> Result<(), String> {
            if !nimbus::fleetlock::group_ok(name) {
                return Err(format!("{key} {name:?}: a group is [a-zA-Z0-9.-]+"));
            }
            if slots == 0 || slots > MAX_SLOTS {
                return Err(format!(
                    "{key} {name:?}: slots {slots} is not 1 to {MAX_SLOTS}"
                ));
            }
            if groups.insert(name.to_string(), slots).is_some() {
                return Err(format!("{key} {name:?}: the group is configured twice"));
            }
            Ok(())
        };
        add(
            &f.lock.default_group_name,
            f.lock.default_slots,
            "lock.default_group_name",
        )?;
        for g in &f.lock.groups {
            add(&g.name, g.slots, "lock.groups")?;
        }
        Ok(Config {
            listen,
            etcd: nimbus_etcd::EtcdOptions {
                endpoints: f
                    .etcd3
                    .endpoints
                    .iter()
                    .map(|e| e.trim_end_matches('/').to_string())
                    .collect(),
                ca_file: f.etcd3.ca_file,
                cert_file: f.etcd3.cert_file,
                key_file: f.etcd3.key_file,
                ..Default::default()
            },
            groups,
        })
    }

    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
[service]
address = "127.0.0.1"
port = 3333

[etcd3]
endpoints = ["http://127.0.0.1:2379/"]

[lock]
default_group_name = "default"
default_slots = 2

[[lock.groups]]
name = "workers"
slots = 1
"#;

    #[test]
    fn airlocks_shape_parses() {
        let c = Config::parse(OK).unwrap();
        assert_eq!(c.listen, "127.0.0.1:3333");
        assert_eq!(c.etcd.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(c.groups.get("default"), Some(&2));
        assert_eq!(c.groups.get("workers"), Some(&1));
    }

    #[test]
    fn bad_values_are_named() {
        for (from, to, want) in [
            ("port = 3333", "port = 99999", "port"),
            (
                "address = \"127.0.0.1\"",
                "address = \"localhost\"",
                "service.address",
            ),
            ("[\"http://127.0.0.1:2379/\"]", "[]", "etcd3.endpoints"),
            (
                "[\"http://127.0.0.1:2379/\"]",
                "[\"ftp://e\"]",
                "etcd3.endpoints",
            ),
            ("default_slots = 2", "default_slots = 0", "slots 0"),
            ("name = \"workers\"", "name = \"default\"", "twice"),
            ("name = \"workers\"", "name = \"a/b\"", "lock.groups"),
            ("slots = 1", "slots = 1\nextra = 2", "unknown field"),
        ] {
            let text = OK.replace(from, to);
            let e = Config::parse(&text).expect_err(to);
            assert!(e.contains(want), "{to}: {e}");
        }
    }
}
