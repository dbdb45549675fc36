//! Checks of single values: names, paths, modes, owners, URLs, encodings.

use super::{Checker, UNIT_SUFFIXES};
use crate::yaml::Node;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// A host name (RFC 1123 labels): the one rule, shared with swarm.conf.
pub use nimbus::swarmconf::hostname_ok as valid_hostname;

pub fn valid_user_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && n.len() <= 32
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

pub fn valid_unit_name(n: &str) -> bool {
    UNIT_SUFFIXES
        .iter()
        .any(|s| n.len() > s.len() && n.ends_with(s))
        && !n.contains('/')
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":-_.\\@".contains(&c))
}

/// Why an absolute path may not be written, if it may not.
pub fn path_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some(format!("path {p:?} must be absolute"));
    }
    if p.split('/').any(|c| c == "..") {
        return Some(format!("path {p:?} contains `..`"));
    }
    if p.contains('\0') {
        return Some("path contains a NUL byte".into());
    }
    let norm: String = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/");
    if norm == "usr" || norm.starts_with("usr/") {
        return Some(format!(
            "path {p:?} is under /usr, which is read-only on Nimbus (dm-verity)"
        ));
    }
    if norm.is_empty() {
        return Some("path is the root directory".into());
    }
    None
}

/// Decode write_files content.
pub fn decode(content: &str, encoding: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let e = encoding.to_ascii_lowercase();
    let b64 = e.ends_with("b64") || e.ends_with("base64");
    let gz = e.starts_with("gz");
    let mut data = if b64 {
        let compact: String = content.chars().filter(|c| !c.is_whitespace()).collect();
        B64.decode(compact)
            .map_err(|err| format!("content is not valid base64: {err}"))?
    } else {
        content.as_bytes().to_vec()
    };
    if gz {
        let mut out = Vec::new();
        // Cap what a small gzip may expand to: a decompression bomb must not
        // fill the disk.
        flate2::read::GzDecoder::new(&data[..])
            .take(64 * 1024 * 1024 + 1)
            .read_to_end(&mut out)
            .map_err(|err| format!("content is not valid gzip: {err}"))?;
        if out.len() > 64 * 1024 * 1024 {
            return Err("gzip content expands to more than 64 MiB".into());
        }
        data = out;
    }
    Ok(data)
}

pub(super) fn parse_mode(raw: &str) -> Option<u32> {
    let t = raw.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    if t.is_empty() || t.len() > 5 || !t.bytes().all(|c| (b'0'..=b'7').contains(&c)) {
        return None;
    }
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o7777)
}

pub(super) fn owner_ok(o: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    };
    match o.split_once(':') {
        Some((u, g)) => ok(u) && ok(g),
        None => ok(o),
    }
}

pub(super) fn check_url(c: &mut Checker, node: &Node, what: &str, s: &str) {
    check_url_at(c, node.line, what, s)
}

pub(super) fn check_url_at(c: &mut Checker, line: usize, what: &str, s: &str) {
    if !(s.starts_with("http://") || s.starts_with("https://")) || s.contains(char::is_whitespace) {
        c.error(line, format!("{what} {s:?} is not an http(s) URL"));
    }
}

pub(super) fn truncate(s: &str) -> String {
    s.chars().take(30).collect()
}

/// An address swarm accepts: an IP, an IP:port, or an interface name.
pub(super) fn swarm_addr_ok(s: &str, port_allowed: bool) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    if port_allowed && s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    // An interface name (eth1, ens4): swarm takes its address.
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && !s.contains('.')
}
