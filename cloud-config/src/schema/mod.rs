//! The coreos-cloudinit `#cloud-config` schema, checked node by node so that
//! every problem is reported with its line, and turned into a typed
//! [`CloudConfig`] when there are no errors.
//!
//! Keys may use `-` or `_` (coreos-cloudinit normalised dashes). Unknown and
//! misplaced keys are errors: coreos-cloudinit ignored them silently
//! (coreos-cloudinit#90, coreos/bugs#199), which let typos through.

mod keys;
mod sections;
mod values;

use crate::yaml::{self, Kind, Node};
/// `nimbus.swarm`: this host's place in a Docker swarm. One manager has
/// `init`; the others `join` the managers listed, with `join_token` or
/// the token the init host published in etcd. Rendered as nimbus-swarm
/// reads it by the contract's own `render`.
pub use nimbus::swarmconf::SwarmConf as Swarm;
use std::fmt;

pub use keys::did_you_mean;
use keys::{home_of, TOP};
use sections::{coreos, nimbus_section, ssh_keys, user, write_file};
pub use values::{decode, path_problem, valid_hostname, valid_unit_name, valid_user_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "line {}: {sev}: {}", self.line, self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudConfig {
    pub hostname: Option<String>,
    pub ssh_authorized_keys: Vec<String>,
    pub users: Vec<User>,
    pub write_files: Vec<WriteFile>,
    pub manage_etc_hosts: bool,
    pub update: Option<Update>,
    pub locksmith: Option<Locksmith>,
    pub oem: Vec<(String, String)>,
    /// Environment drop-ins for etcd, fleet, flannel.
    pub env_dropins: Vec<EnvDropIn>,
    pub units: Vec<Unit>,
    /// The `nimbus:` section: Nimbus's own keys.
    pub nimbus: Option<NimbusSection>,
}

/// `nimbus:` at the top level.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NimbusSection {
    pub swarm: Option<Swarm>,
    /// `nimbus.etcd_insecure_plaintext: true`: the operator accepts etcd
    /// reachable from the network without TLS client certificates (what
    /// `validate` otherwise refuses); it warns instead.
    pub etcd_insecure_plaintext: bool,
    /// update.conf's HOOK_TIMEOUT: how long each update hook may run.
    pub hook_timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    pub name: String,
    pub passwd: Option<String>,
    pub gecos: Option<String>,
    pub homedir: Option<String>,
    pub no_create_home: bool,
    pub primary_group: Option<String>,
    pub groups: Vec<String>,
    pub shell: Option<String>,
    pub system: bool,
    pub no_user_group: bool,
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFile {
    pub path: String,
    /// Decoded.
    pub content: Vec<u8>,
    pub owner: Option<String>,
    pub permissions: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub reboot_strategy: Option<nimbus::updateconf::RebootStrategy>,
    pub server: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Locksmith {
    pub endpoint: Option<String>,
    /// FLEETLOCK_URL and FLEETLOCK_GROUP (`REBOOT_STRATEGY=fleetlock`).
    pub fleetlock_url: Option<String>,
    pub fleetlock_group: Option<String>,
    pub etcd_cafile: Option<String>,
    pub etcd_certfile: Option<String>,
    pub etcd_keyfile: Option<String>,
    pub group: Option<String>,
    pub window_start: Option<String>,
    pub window_length: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvDropIn {
    pub unit: &'static str,
    /// (VARIABLE, value), in file order.
    pub vars: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unit {
    pub name: String,
    pub content: Option<String>,
    pub enable: bool,
    pub runtime: bool,
    pub mask: bool,
    pub command: Option<String>,
    pub drop_ins: Vec<(String, String)>,
}

/// What a user-data file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserData {
    CloudConfig(Box<CloudConfig>),
    /// A `#!` script, run once as a transient unit at apply time.
    Script(Vec<u8>),
    /// Empty or whitespace only: nothing to do.
    Empty,
}

pub const UNIT_COMMANDS: &[&str] = &[
    "start",
    "stop",
    "restart",
    "reload",
    "try-restart",
    "reload-or-restart",
    "reload-or-try-restart",
];

const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".mount",
    ".automount",
    ".path",
    ".slice",
    ".swap",
    ".device",
    ".scope",
    ".network",
    ".netdev",
    ".link",
];

pub const NETWORK_SUFFIXES: &[&str] = &[".network", ".netdev", ".link"];

const ENCODINGS: &[&str] = &[
    "",
    "b64",
    "base64",
    "gz",
    "gzip",
    "gz+b64",
    "gz+base64",
    "gzip+b64",
    "gzip+base64",
];

/// Collects problems while walking.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    /// Line of the key whose value is being checked, for messages about the
    /// key itself (deprecated, conflicting).
    key_line: usize,
}

impl Checker {
    fn error(&mut self, line: usize, msg: impl Into<String>) {
        self.problems.push(Problem {
            line,
            severity: Severity::Error,
            message: msg.into(),
        });
    }
    fn warn(&mut self, line: usize, msg: impl Into<String>) {
        self.problems.push(Problem {
            line,
            severity: Severity::Warning,
            message: msg.into(),
        });
    }

    /// Walk a mapping with a fixed key set. Calls `f(normalised_key, value)`
    /// for each known key whose value is not null.
    fn map<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
        mut f: impl FnMut(&mut Self, &str, &'n Node),
    ) {
        let Kind::Map(entries) = &node.kind else {
            if !node.is_null() {
                self.error(
                    node.line,
                    format!("{what} must be a mapping, found {}", node.type_name()),
                );
            }
            return;
        };
        let mut seen: Vec<String> = Vec::new();
        for (k, v) in entries {
            let Some(raw) = k.as_str() else {
                self.error(
                    k.line,
                    format!("a key in {what} must be a string, found {}", k.type_name()),
                );
                continue;
            };
            let key = raw.replace('-', "_");
            if seen.contains(&key) {
                self.error(k.line, format!("duplicate key `{raw}` in {what}"));
                continue;
            }
            seen.push(key.clone());
            if known.contains(&key.as_str()) {
                if !v.is_null() {
                    self.key_line = k.line;
                    f(self, &key, v);
                }
            } else if let Some(home) = home_of(&key, what) {
                self.error(
                    k.line,
                    format!("key `{raw}` is misplaced in {what}: it belongs under {home}"),
                );
            } else {
                let hint = did_you_mean(&key, known)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.error(k.line, format!("unknown key `{raw}` in {what}{hint}"));
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar { value, .. } => Some(value.clone()),
            _ => {
                self.error(
                    node.line,
                    format!("{what} must be a string, found {}", node.type_name()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        // YAML 1.1 booleans, as old CoreOS files use them, when unquoted.
        if let Kind::Scalar { value, plain } = &node.kind {
            let b = match value.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "y" => Some(true),
                "false" | "no" | "off" | "n" => Some(false),
                _ => None,
            };
            if let Some(b) = b {
                // Quoted, it is a string to YAML; Vagrant's CoreOS guest
                // writes `runtime: 'no'` (Ruby quotes words YAML 1.1 reads
                // as booleans), and coreos-cloudinit took it as meant.
                if !plain {
                    self.warn(
                        node.line,
                        format!("{what}: the quoted {value:?} is read as {b} (write it unquoted)"),
                    );
                }
                return Some(b);
            }
        }
        let found = match &node.kind {
            Kind::Scalar { value, .. } => format!("{value:?}"),
            _ => node.type_name().to_string(),
        };
        self.error(
            node.line,
            format!("{what} must be true or false, found {found}"),
        );
        None
    }

    fn strings(&mut self, node: &Node, what: &str) -> Vec<String> {
        match &node.kind {
            Kind::Seq(items) => items
                .iter()
                .filter_map(|i| self.string(i, &format!("each entry of {what}")))
                .collect(),
            _ => {
                self.error(
                    node.line,
                    format!("{what} must be a list, found {}", node.type_name()),
                );
                Vec::new()
            }
        }
    }

    fn list<'n>(&mut self, node: &'n Node, what: &str) -> &'n [Node] {
        match &node.kind {
            Kind::Seq(items) => items,
            _ => {
                self.error(
                    node.line,
                    format!("{what} must be a list, found {}", node.type_name()),
                );
                &[]
            }
        }
    }
}

/// Parse and check a whole user-data file.
pub fn check(text: &str) -> (Option<UserData>, Vec<Problem>) {
    let mut c = Checker::default();
    let out = check_inner(text, &mut c);
    let has_error = c.problems.iter().any(|p| p.severity == Severity::Error);
    c.problems.sort_by_key(|p| (p.line, p.severity));
    (if has_error { None } else { out }, c.problems)
}

fn check_inner(text: &str, c: &mut Checker) -> Option<UserData> {
    if text.trim().is_empty() {
        return Some(UserData::Empty);
    }
    if text.starts_with("#!") {
        return Some(UserData::Script(text.as_bytes().to_vec()));
    }
    let first = text.lines().next().unwrap_or("");
    if first.trim_end() != "#cloud-config" {
        c.error(1, "missing `#cloud-config` header: the first line must be exactly `#cloud-config` (or `#!` for a script)");
        return None;
    }
    let root = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            c.error(e.line(), e.to_string());
            return None;
        }
    };
    let mut cfg = CloudConfig::default();
    // etcd exposed to the network without client certificates: errors
    // unless `nimbus.etcd_insecure_plaintext` says so, which may come
    // before or after `coreos` in the document.
    let mut exposed: Vec<(usize, String)> = Vec::new();
    c.map(&root, "top level", TOP, |c, key, v| match key {
        "hostname" => {
            if let Some(h) = c.string(v, "hostname") {
                if valid_hostname(&h) {
                    cfg.hostname = Some(h);
                } else {
                    c.error(
                        v.line,
                        format!("hostname {h:?} is not a valid host name (RFC 1123)"),
                    );
                }
            }
        }
        "ssh_authorized_keys" => cfg.ssh_authorized_keys = ssh_keys(c, v, "ssh_authorized_keys"),
        "manage_etc_hosts" => {
            if let Some(s) = c.string(v, "manage_etc_hosts") {
                match s.as_str() {
                    "localhost" => cfg.manage_etc_hosts = true,
                    "" => {}
                    other => c.error(
                        v.line,
                        format!("manage_etc_hosts must be \"localhost\", found {other:?}"),
                    ),
                }
            }
        }
        "users" => {
            for u in c.list(v, "users") {
                if let Some(user) = user(c, u) {
                    cfg.users.push(user);
                }
            }
        }
        "write_files" => {
            for f in c.list(v, "write_files") {
                if let Some(wf) = write_file(c, f) {
                    cfg.write_files.push(wf);
                }
            }
        }
        "coreos" => coreos(c, v, &mut cfg, &mut exposed),
        "nimbus" => cfg.nimbus = Some(nimbus_section(c, v)),
        _ => {}
    });
    let insecure = cfg
        .nimbus
        .as_ref()
        .is_some_and(|n| n.etcd_insecure_plaintext);
    for (line, msg) in exposed {
        if insecure {
            c.warn(line, format!("{msg} (allowed by nimbus.etcd_insecure_plaintext: anyone who reaches it can read the cluster's keys and take its reboot lock)"));
        } else {
            c.error(line, format!("{msg}; anyone who reaches it could read the swarm's join tokens and rewrite the reboot lock. Use https:// with client-cert-auth (docs/cluster.md, \"Securing etcd\"), or set nimbus.etcd_insecure_plaintext: true to accept the risk"));
        }
    }
    let mut paths: Vec<&str> = Vec::new();
    for f in &cfg.write_files {
        if paths.contains(&f.path.as_str()) {
            c.warn(
                root.line,
                format!(
                    "write_files: {} is written more than once; the last entry wins",
                    f.path
                ),
            );
        }
        paths.push(&f.path);
    }
    Some(UserData::CloudConfig(Box::new(cfg)))
}
