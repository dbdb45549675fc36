//! The etcd client Nimbus's host tools share (update-engine, updatectl,
//! nimbus-swarm): etcd's v3 JSON gateway over reqwest, with TLS client
//! certificates, bounded answers and a deadline on every call.
//!
//! - [`lock`]: the client and the cluster reboot lock, a counting
//!   semaphore in locksmith's format, changed only by compare-and-swap.
//! - [`leader`]: handing etcd leadership to another member before this
//!   host reboots (the pre-reboot hook 60-etcd-leader).
//! - [`options_from_conf`]: the etcd settings of update.conf (`ETCD_*`,
//!   `REBOOT_GROUP`), checked, the one reader of those keys.
//!
//! The key names are contracts in `nimbus::etcd_keys`.

pub mod leader;
pub mod lock;

use nimbus::updateconf::UpdateConf;

pub use lock::{EtcdOptions, LockClient, LockError, Semaphore};

/// Where etcd answers when update.conf names no endpoint (this host).
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// The etcd settings alone (`updatectl lock` needs no SERVER).
pub fn options_from_conf(c: &UpdateConf) -> Result<EtcdOptions, String> {
    let endpoints: Vec<String> = c
        .get("ETCD_ENDPOINTS")
        .unwrap_or(DEFAULT_ENDPOINT)
        .split(',')
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .collect();
    for e in &endpoints {
        let u = reqwest::Url::parse(e).map_err(|err| format!("ETCD_ENDPOINTS: {e:?}: {err}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(format!(
                "ETCD_ENDPOINTS: {e:?}: only http and https are supported"
            ));
        }
    }
    if endpoints.is_empty() {
        return Err("ETCD_ENDPOINTS is empty".into());
    }
    let path = |k: &str| {
        c.get(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let etcd = EtcdOptions {
        endpoints,
        ca_file: path("ETCD_CAFILE"),
        cert_file: path("ETCD_CERTFILE"),
        key_file: path("ETCD_KEYFILE"),
        username: c.get("ETCD_USERNAME").map(str::to_string),
        password: c.get("ETCD_PASSWORD").map(str::to_string),
        group: c.get("REBOOT_GROUP").map(str::to_string),
    };
    if etcd.cert_file.is_some() != etcd.key_file.is_some() {
        return Err("ETCD_CERTFILE and ETCD_KEYFILE must be set together".into());
    }
    if etcd.username.is_some() != etcd.password.is_some() {
        return Err("ETCD_USERNAME and ETCD_PASSWORD must be set together".into());
    }
    if etcd.password.is_some() {
        if let Some(e) = etcd.endpoints.iter().find(|e| plain_http_off_host(e)) {
            return Err(format!(
                "ETCD_PASSWORD: would cross the network in the clear to {e}; use https:// (or an endpoint on this host)"
            ));
        }
    }
    if let Some(g) = &etcd.group {
        if !nimbus::release::valid_channel_name(g) {
            return Err(format!("REBOOT_GROUP={g:?}: use [a-z0-9._-]{{1,64}}"));
        }
    }
    Ok(etcd)
}

/// `http://` to anything but this host's loopback.
fn plain_http_off_host(endpoint: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(endpoint) else {
        return true;
    };
    if u.scheme() != "http" {
        return false;
    }
    match u.host_str() {
        Some("localhost") => false,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map_or(true, |a| !a.is_loopback()),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> UpdateConf {
        UpdateConf::parse(text).expect("parses")
    }

    #[test]
    fn defaults_to_this_hosts_etcd() {
        let o = options_from_conf(&conf("")).expect("valid");
        assert_eq!(o.endpoints, vec![DEFAULT_ENDPOINT.to_string()]);
        assert_eq!(o.group, None);
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (text, key) in [
            ("ETCD_ENDPOINTS=ftp://e", "ETCD_ENDPOINTS"),
            ("ETCD_ENDPOINTS=,", "ETCD_ENDPOINTS"),
            ("ETCD_CERTFILE=/c", "ETCD_CERTFILE"),
            ("ETCD_USERNAME=u", "ETCD_USERNAME"),
            ("REBOOT_GROUP=A B", "REBOOT_GROUP"),
        ] {
            let e = options_from_conf(&conf(text)).expect_err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn a_password_never_goes_over_plain_http_off_this_host() {
        let auth = "ETCD_USERNAME=root\nETCD_PASSWORD=secret\n";
        for ok in [
            "ETCD_ENDPOINTS=http://127.0.0.1:2379",
            "ETCD_ENDPOINTS=http://localhost:2379",
            "ETCD_ENDPOINTS=http://[::1]:2379",
            "ETCD_ENDPOINTS=https://10.0.0.5:2379",
        ] {
            options_from_conf(&conf(&format!("{auth}{ok}"))).expect(ok);
        }
        for bad in [
            "ETCD_ENDPOINTS=http://10.0.0.5:2379",
            "ETCD_ENDPOINTS=https://10.0.0.6:2379,http://etcd.example.com:2379",
        ] {
            let e = options_from_conf(&conf(&format!("{auth}{bad}"))).expect_err(bad);
            assert!(
                e.contains("ETCD_PASSWORD") && e.contains("in the clear"),
                "{e}"
            );
        }
        // Without a password nothing secret travels: plain http stays allowed.
        options_from_conf(&conf("ETCD_ENDPOINTS=http://10.0.0.5:2379")).expect("no password");
    }

    #[test]
    fn endpoints_lose_trailing_slashes_and_blanks() {
        let o = options_from_conf(&conf(
            "ETCD_ENDPOINTS=http://a:2379/, https://b:2379\nETCD_CERTFILE=/c\nETCD_KEYFILE=/k\nREBOOT_GROUP=web",
        ))
        .expect("valid");
        assert_eq!(o.endpoints, vec!["http://a:2379", "https://b:2379"]);
        assert_eq!(o.group.as_deref(), Some("web"));
        assert!(o.cert_file.is_some() && o.key_file.is_some());
    }
}
