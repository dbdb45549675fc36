//! `/etc/nimbus/swarm.conf`: this host's place in a Docker swarm, written
//! by cloud-config from `nimbus.swarm` and read by nimbus-swarm. Rendered
//! and parsed here only, so the two sides cannot drift apart.

/// A swarm node's role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    Manager,
    #[default]
    Worker,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            _ => Err(format!("{s:?} is not manager or worker")),
        }
    }
}

/// Who starts the swarm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Init {
    /// This host joins one that did.
    #[default]
    No,
    /// This host starts it (one manager of the cluster).
    Yes,
    /// The first manager to claim [`crate::etcd_keys::SWARM_FOUNDER`] in
    /// etcd starts it and the others join it: one user-data for every
    /// host (a Vagrant cluster, an autoscaling group).
    Auto,
}

impl Init {
    pub fn name(self) -> &'static str {
        match self {
            Init::No => "no",
            Init::Yes => "yes",
            Init::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SwarmConf {
    pub role: Role,
    pub init: Init,
    /// The address other hosts reach this one at (IP, IP:port, interface).
    pub advertise_addr: String,
    pub listen_addr: Option<String>,
    /// Managers to join (host or IP, optionally :port).
    pub join: Vec<String>,
    /// The token to join with; else the one published in etcd
    /// ([`crate::etcd_keys::SWARM_JOIN_TOKEN`]).
    pub join_token: Option<String>,
    /// The cluster secret (32 bytes) the worker token is sealed with in
    /// etcd; without it nothing is published and joins need `join_token`.
    pub secret: Option<Secret>,
    /// Hostnames the managers of the swarm promote once they joined (as
    /// workers: no manager token ever leaves a manager).
    pub managers: Vec<String>,
}

/// The cluster secret; its `Debug` never shows it (a conf may be logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A cluster secret as written: 64 hex digits.
pub fn parse_secret(v: &str) -> Result<Secret, String> {
    let v = v.trim();
    let mut out = [0u8; 32];
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be 64 hex digits (32 random bytes: `openssl rand -hex 32`)".into());
    }
    for (i, o) in out.iter_mut().enumerate() {
        let pair = v.get(2 * i..2 * i + 2).ok_or("must be 64 hex digits")?;
        *o = u8::from_str_radix(pair, 16).map_err(|e| e.to_string())?;
    }
    Ok(Secret(out))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A host name as swarm shows it (`docker node ls`'s HOSTNAME).
pub fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// What is wrong with a file; `line` when one line is to blame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct ConfError {
    pub line: Option<usize>,
    pub reason: String,
}

impl SwarmConf {
    pub fn manager(&self) -> bool {
        self.role == Role::Manager
    }

    pub fn role(&self) -> &'static str {
        self.role.name()
    }

    /// The whole rule set, for a value built in code (cloud-config) or
    /// parsed.
    pub fn check(&self) -> Result<(), String> {
        if self.advertise_addr.is_empty() {
            return Err("ADVERTISE_ADDR is not set".into());
        }
        if self.init != Init::No && !self.manager() {
            return Err(format!("INIT={} needs ROLE=manager", self.init.name()));
        }
        if self.init == Init::Auto && self.secret.is_none() {
            return Err(
                "INIT=auto needs SECRET (the joiners open the worker token with it)".into(),
            );
        }
        if self.init == Init::No && self.join.is_empty() {
            return Err("JOIN is empty and INIT is not yes or auto".into());
        }
        Ok(())
    }

    pub fn render(&self) -> String {
        let mut out =
            String::from("# Written by cloud-config from nimbus.swarm; read by nimbus-swarm.\n");
        out.push_str(&format!("ROLE={}\n", self.role()));
        out.push_str(&format!("INIT={}\n", self.init.name()));
        out.push_str(&format!("ADVERTISE_ADDR={}\n", self.advertise_addr));
        if let Some(l) = &self.listen_addr {
            out.push_str(&format!("LISTEN_ADDR={l}\n"));
        }
        if !self.join.is_empty() {
            out.push_str(&format!("JOIN={}\n", self.join.join(",")));
        }
        if let Some(t) = &self.join_token {
            out.push_str(&format!("JOIN_TOKEN={t}\n"));
        }
        if let Some(s) = &self.secret {
            out.push_str(&format!("SECRET={}\n", hex(&s.0)));
        }
        if !self.managers.is_empty() {
            out.push_str(&format!("MANAGERS={}\n", self.managers.join(",")));
        }
        out
    }

    pub fn parse(text: &str) -> Result<SwarmConf, ConfError> {
        let mut c = SwarmConf::default();
        let mut role = None;
        for (i, l) in text.lines().enumerate() {
            let t = l.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let bad = |reason: String| ConfError {
                line: Some(i + 1),
                reason,
            };
            let (k, v) = t
                .split_once('=')
                .ok_or_else(|| bad(format!("expected KEY=value, found {t:?}")))?;
            let v = v.trim().to_string();
            match k.trim() {
                "ROLE" => role = Some(v.parse().map_err(|e| bad(format!("ROLE={e}")))?),
                "INIT" => {
                    c.init = match v.as_str() {
                        "yes" | "true" => Init::Yes,
                        "no" | "false" => Init::No,
                        "auto" => Init::Auto,
                        _ => return Err(bad(format!("INIT={v:?}: use yes, no or auto"))),
                    }
                }
                "ADVERTISE_ADDR" => c.advertise_addr = v,
                "LISTEN_ADDR" => c.listen_addr = Some(v),
                "JOIN" => {
                    c.join = v
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                }
                "JOIN_TOKEN" => c.join_token = Some(v),
                "SECRET" => {
                    c.secret = Some(parse_secret(&v).map_err(|e| bad(format!("SECRET {e}")))?)
                }
                "MANAGERS" => {
                    c.managers = v
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect();
                    if let Some(h) = c.managers.iter().find(|h| !hostname_ok(h)) {
                        return Err(bad(format!("MANAGERS: {h:?} is not a host name")));
                    }
                }
                other => return Err(bad(format!("unknown key {other}"))),
            }
        }
        let missing = |reason: String| ConfError { line: None, reason };
        c.role = role.ok_or_else(|| missing("ROLE is not set".into()))?;
        c.check().map_err(missing)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_rendered_parses_back_the_same() {
        for c in [
            SwarmConf {
                role: Role::Manager,
                init: Init::Yes,
                advertise_addr: "10.0.0.1".into(),
                ..SwarmConf::default()
            },
            SwarmConf {
                role: Role::Worker,
                init: Init::No,
                advertise_addr: "eth1".into(),
                listen_addr: Some("0.0.0.0:2377".into()),
                join: vec!["10.0.0.1:2377".into(), "m2".into()],
                join_token: Some("SWMTKN-1-aaa-www".into()),
                ..SwarmConf::default()
            },
            SwarmConf {
                role: Role::Manager,
                init: Init::Yes,
                advertise_addr: "10.0.0.1".into(),
                secret: Some(Secret([0xa5; 32])),
                managers: vec!["h1".into(), "h2.example.com".into()],
                ..SwarmConf::default()
            },
            SwarmConf {
                role: Role::Manager,
                init: Init::Auto,
                advertise_addr: "172.17.8.101".into(),
                secret: Some(Secret([0x5a; 32])),
                managers: vec!["core-01".into(), "core-02".into()],
                ..SwarmConf::default()
            },
        ] {
            assert_eq!(SwarmConf::parse(&c.render()).unwrap(), c);
        }
    }

    #[test]
    fn bad_files_name_their_line_or_what_is_missing() {
        let c = SwarmConf::parse(
            "# x\nROLE=manager\nINIT=no\nADVERTISE_ADDR=10.0.0.2\nJOIN=10.0.0.1:2377, 10.0.0.3:2377\n",
        )
        .unwrap();
        assert!(c.manager() && c.init == Init::No);
        assert_eq!(c.join, ["10.0.0.1:2377", "10.0.0.3:2377"]);
        for (text, want) in [
            (
                "ROLE=boss\n",
                "line 1: ROLE=\"boss\" is not manager or worker",
            ),
            (
                "ROLE=worker\nINIT=yes\nADVERTISE_ADDR=a\n",
                "INIT=yes needs ROLE=manager",
            ),
            (
                "ROLE=worker\nADVERTISE_ADDR=a\n",
                "JOIN is empty and INIT is not yes or auto",
            ),
            ("ROLE=worker\nJOIN=a\n", "ADVERTISE_ADDR is not set"),
            (
                "ROLE=manager\nINIT=auto\nADVERTISE_ADDR=10.0.0.1\n",
                "INIT=auto needs SECRET (the joiners open the worker token with it)",
            ),
            (
                "ROLE=worker\nINIT=maybe\n",
                "line 2: INIT=\"maybe\": use yes, no or auto",
            ),
            (
                "ROLE=worker\nnonsense\n",
                "line 2: expected KEY=value, found \"nonsense\"",
            ),
            ("ROLE=worker\nCOLOUR=red\n", "line 2: unknown key COLOUR"),
            (
                "ROLE=worker\nSECRET=abc\n",
                "line 2: SECRET must be 64 hex digits (32 random bytes: `openssl rand -hex 32`)",
            ),
            (
                "ROLE=worker\nMANAGERS=h1,-h2\n",
                "line 2: MANAGERS: \"-h2\" is not a host name",
            ),
            ("INIT=yes\n", "ROLE is not set"),
        ] {
            assert_eq!(
                SwarmConf::parse(text).unwrap_err().to_string(),
                want,
                "{text:?}"
            );
        }
    }
}
