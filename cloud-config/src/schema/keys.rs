//! The keys each section knows (coreos-cloudinit's, and Nimbus's own), and
//! the "did you mean" for the rest.

pub(super) const TOP: &[&str] = &[
    "hostname",
    "ssh_authorized_keys",
    "users",
    "write_files",
    "manage_etc_hosts",
    "coreos",
    "nimbus",
];

pub(super) const NIMBUS: &[&str] = &["swarm", "hook_timeout", "etcd_insecure_plaintext"];

pub(super) const SWARM: &[&str] = &[
    "role",
    "init",
    "advertise_addr",
    "listen_addr",
    "join",
    "join_token",
    "secret",
    "managers",
];

pub(super) const COREOS: &[&str] = &[
    "etcd",
    "etcd2",
    "fleet",
    "flannel",
    "locksmith",
    "update",
    "oem",
    "units",
];

pub(super) const USER: &[&str] = &[
    "name",
    "passwd",
    "gecos",
    "homedir",
    "no_create_home",
    "primary_group",
    "groups",
    "no_user_group",
    "ssh_authorized_keys",
    "coreos_ssh_import_github",
    "coreos_ssh_import_github_users",
    "coreos_ssh_import_url",
    "system",
    "no_log_init",
    "shell",
];

pub(super) const WRITE_FILE: &[&str] = &["path", "content", "encoding", "owner", "permissions"];

pub(super) const UNIT: &[&str] = &[
    "name", "content", "enable", "runtime", "mask", "command", "drop_ins",
];

pub(super) const DROP_IN: &[&str] = &["name", "content"];

pub(super) const UPDATE: &[&str] = &["reboot_strategy", "server", "group"];

pub(super) const LOCKSMITH: &[&str] = &[
    "endpoint",
    "etcd_cafile",
    "etcd_certfile",
    "etcd_keyfile",
    "fleetlock_group",
    "fleetlock_url",
    "group",
    "window_start",
    "window_length",
];

pub(super) const OEM: &[&str] = &["id", "name", "version_id", "home_url", "bug_report_url"];

pub(super) const ETCD2: &[&str] = &[
    "advertise_client_urls",
    "ca_file",
    "cert_file",
    "client_cert_auth",
    "cors",
    "data_dir",
    "debug",
    "discovery",
    "discovery_fallback",
    "discovery_proxy",
    "discovery_srv",
    "election_timeout",
    "enable_pprof",
    "force_new_cluster",
    "heartbeat_interval",
    "initial_advertise_peer_urls",
    "initial_cluster",
    "initial_cluster_state",
    "initial_cluster_token",
    "key_file",
    "listen_client_urls",
    "listen_peer_urls",
    "log_package_levels",
    "max_snapshots",
    "max_wals",
    "name",
    "peer_ca_file",
    "peer_cert_file",
    "peer_client_cert_auth",
    "peer_key_file",
    "peer_trusted_ca_file",
    "proxy",
    "proxy_dial_timeout",
    "proxy_failure_wait",
    "proxy_read_timeout",
    "proxy_refresh_interval",
    "proxy_write_timeout",
    "snapshot_count",
    "strict_reconfig_check",
    "trusted_ca_file",
    "wal_dir",
];

pub(super) const ETCD: &[&str] = &[
    "addr",
    "bind_addr",
    "ca_file",
    "cert_file",
    "cluster_active_size",
    "cluster_remove_delay",
    "cluster_sync_interval",
    "cors",
    "data_dir",
    "discovery",
    "graphite_host",
    "http_read_timeout",
    "http_write_timeout",
    "key_file",
    "max_cluster_size",
    "max_result_buffer",
    "max_retry_attempts",
    "name",
    "peer_addr",
    "peer_bind_addr",
    "peer_ca_file",
    "peer_cert_file",
    "peer_election_timeout",
    "peer_heartbeat_interval",
    "peer_key_file",
    "peers",
    "peers_file",
    "retry_interval",
    "snapshot",
    "snapshot_count",
    "strtrace",
    "verbose",
    "very_verbose",
];

pub(super) const FLEET: &[&str] = &[
    "agent_ttl",
    "authorized_keys_file",
    "disable_engine",
    "disable_watches",
    "enable_grpc",
    "engine_reconcile_interval",
    "etcd_cafile",
    "etcd_certfile",
    "etcd_key_prefix",
    "etcd_keyfile",
    "etcd_request_timeout",
    "etcd_servers",
    "metadata",
    "public_ip",
    "token_limit",
    "verbosity",
    "verify_units",
];

pub(super) const FLANNEL: &[&str] = &[
    "etcd_cafile",
    "etcd_certfile",
    "etcd_endpoints",
    "etcd_keyfile",
    "etcd_password",
    "etcd_prefix",
    "etcd_username",
    "interface",
    "ip_masq",
    "kube_subnet_mgr",
    "public_ip",
    "remote",
    "remote_cafile",
    "remote_certfile",
    "remote_keyfile",
    "subnet_file",
];

/// Keys that are valid somewhere else: a better message than "unknown".
pub(super) fn home_of(key: &str, here: &str) -> Option<&'static str> {
    if here != "top level" && TOP.contains(&key) {
        return Some("the top level");
    }
    if here != "coreos" && COREOS.contains(&key) {
        return Some("`coreos`");
    }
    None
}

pub(super) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

pub fn did_you_mean<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

pub(super) const ETCD2_URL_LISTS: &[&str] = &[
    "advertise_client_urls",
    "initial_advertise_peer_urls",
    "listen_client_urls",
    "listen_peer_urls",
];
