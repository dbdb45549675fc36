//! What the cluster keeps to itself, checked once the swarm has formed:
//! etcd answers only a client with a certificate of the cluster's CA (not
//! plain HTTP, not TLS without a certificate); the manager join token is
//! not in etcd and the worker token is there sealed; no join token was on
//! any process's command line while the hosts joined (each host's witness
//! counted); root's etcdctl on a host works through the certificate.

use super::host::Host;
use super::probe::{etcd_post, http};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::time::Duration;

/// `refused` when the request got no etcd data back, else what it got.
fn outcome(r: Result<reqwest::blocking::Response, reqwest::Error>) -> String {
    match r {
        Err(_) => "refused".into(),
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().unwrap_or_default();
            if status.is_success() && body.contains("\"header\"") {
                format!("answered (HTTP {status})")
            } else {
                "refused".into()
            }
        }
    }
}

fn value(hosts: &[Host], key: &str) -> anyhow::Result<Option<String>> {
    let r = etcd_post(
        &http(),
        &hosts[0].etcd(),
        "/v3/kv/range",
        serde_json::json!({"key": B64.encode(key)}),
    )?;
    Ok(match r["kvs"][0]["value"].as_str() {
        Some(v) => Some(String::from_utf8_lossy(&B64.decode(v)?).into_owned()),
        None => None,
    })
}

pub(super) fn check(hosts: &[Host], pki: &crate::cluster_config::Pki) -> anyhow::Result<String> {
    let port = hosts[0].etcd_port;
    let body = serde_json::json!({"key": B64.encode("nimbus/")});
    // TLS, trusting the cluster's CA, but with no certificate to show.
    let ca = reqwest::Certificate::from_pem(pki.ca.cert.as_bytes())?;
    let anonymous = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()?;
    let plain = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let ask = |c: &reqwest::blocking::Client, scheme: &str| {
        outcome(
            c.post(format!("{scheme}://127.0.0.1:{port}/v3/kv/range"))
                .json(&body)
                .send(),
        )
    };
    let no_cert = ask(&anonymous, "https");
    let plain_http = ask(&plain, "http");
    let manager = value(hosts, &format!("{}/manager", nimbus_swarm::TOKEN_KEY))?;
    let worker = value(hosts, &nimbus_swarm::worker_token_key())?;
    let sealed = worker
        .as_deref()
        .is_some_and(|w| w.starts_with(nimbus_swarm::seal::PREFIX) && !w.contains("SWMTKN"));
    let mut samples = Vec::new();
    let mut hits = 0u64;
    let mut who = Vec::new();
    for h in hosts {
        let t = h.sh(
            "cat /run/token-watch 2>/dev/null; echo; cat /run/token-watch.who 2>/dev/null; true",
        )?;
        let mut lines = t.lines();
        let tally = lines.next().unwrap_or_default();
        let field = |k: &str| -> u64 {
            tally
                .split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        samples.push(format!("{}:{}", h.name, field("samples=")));
        hits += field("hits=");
        who.extend(
            lines
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("{}:{}", h.name, l.trim())),
        );
    }
    // A login shell, as an operator's: the profile gives etcdctl the
    // host's certificate.
    let etcdctl = hosts[1]
        .ssh
        .run_within("bash -lc 'etcdctl member list'", Duration::from_secs(60))
        .map(|o| {
            let ok = o.status.success() && String::from_utf8_lossy(&o.stdout).contains("h1");
            if !ok {
                eprintln!(
                    "cluster: etcdctl on {} ({}): {}{}",
                    hosts[1].name,
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            ok
        })
        .unwrap_or_else(|e| {
            eprintln!("cluster: etcdctl on {}: {e:#}", hosts[1].name);
            false
        });
    Ok(format!(
        "cluster-secrets: no_cert={} plain_http={} manager_token_in_etcd={} worker_token_sealed={} token_in_cmdline={hits} cmdline_samples={} etcdctl_on_host={}{}",
        no_cert.replace(' ', "_"),
        plain_http.replace(' ', "_"),
        if manager.is_some() { "yes" } else { "no" },
        if sealed { "yes" } else { "no" },
        samples.join(","),
        if etcdctl { "yes" } else { "no" },
        if who.is_empty() {
            String::new()
        } else {
            format!(" seen_in={}", who.join(","))
        },
    ))
}
