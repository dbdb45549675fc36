//! FleetLock, the reboot-lock protocol of Fedora CoreOS's Zincati (servers:
//! airlock on etcd v3, poseidon/fleetlock on Kubernetes): the one definition
//! update-engine's client and `nimbus-fleetlock`'s server both import.
//!
//! `POST {base}/v1/pre-reboot` takes a slot, `POST {base}/v1/steady-state`
//! gives it back; both carry the header `fleet-lock-protocol: true` and the
//! body `{"client_params":{"id":"<node id>","group":"<group>"}}`. 200 is
//! success; anything else is a failure the client retries, with the body
//! `{"kind":"...","value":"..."}`.
//!
//! The server keeps each group's semaphore where airlock does, in etcd v3
//! under `com.coreos.airlock/groups/<group>/v1/semaphore` as
//! `{"total_slots":N,"holders":["<id>",...]}`, so Zincati hosts and Nimbus
//! hosts behind either server share one lock.

use sha2::{Digest, Sha256};

pub const HEADER: &str = "fleet-lock-protocol";
pub const HEADER_VALUE: &str = "true";
pub const PRE_REBOOT: &str = "v1/pre-reboot";
pub const STEADY_STATE: &str = "v1/steady-state";
pub const DEFAULT_GROUP: &str = "default";
/// The longest group name and node id accepted (airlock's ids are 32 hex
/// digits; the cap keeps etcd values small).
pub const MAX_GROUP_LEN: usize = 253;
pub const MAX_ID_LEN: usize = 256;
/// A request body larger than this is refused unread.
pub const MAX_BODY: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientParams {
    pub id: String,
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub client_params: ClientParams,
}

/// A failure's body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub value: String,
}

/// Groups are `[a-zA-Z0-9.-]+` (Zincati's rule).
pub fn group_ok(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= MAX_GROUP_LEN
        && g.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
}

/// Node ids: printable ASCII without blanks, bounded.
pub fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|c| c.is_ascii_graphic())
}

impl Request {
    pub fn new(id: &str, group: &str) -> Request {
        Request {
            client_params: ClientParams {
                id: id.to_string(),
                group: group.to_string(),
            },
        }
    }

    /// Parse and check a body: the error names what is wrong.
    pub fn parse(body: &[u8]) -> Result<Request, String> {
        if body.len() > MAX_BODY {
            return Err(format!("body larger than {MAX_BODY} bytes"));
        }
        let r: Request =
            serde_json::from_slice(body).map_err(|e| format!("not a FleetLock request: {e}"))?;
        if !id_ok(&r.client_params.id) {
            return Err(format!(
                "client_params.id {:?}: 1 to {MAX_ID_LEN} printable characters without blanks",
                r.client_params.id
            ));
        }
        if !group_ok(&r.client_params.group) {
            return Err(format!(
                "client_params.group {:?}: 1 to {MAX_GROUP_LEN} of [a-zA-Z0-9.-]",
                r.client_params.group
            ));
        }
        Ok(r)
    }
}

/// The etcd v3 key of a group's semaphore (airlock's).
pub fn semaphore_key(group: &str) -> String {
    format!("com.coreos.airlock/groups/{group}/v1/semaphore")
}

/// A group's semaphore as airlock stores it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Semaphore {
    pub total_slots: u64,
    pub holders: Vec<String>,
}

impl Semaphore {
    /// Check a stored value: a holder listed twice or an empty one means
    /// someone else wrote it; it is reported, never repaired by guessing.
    pub fn parse(raw: &[u8]) -> Result<Semaphore, String> {
        let s: Semaphore = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        let mut seen = std::collections::BTreeSet::new();
        if let Some(h) = s
            .holders
            .iter()
            .find(|h| !seen.insert(h.as_str()) || !id_ok(h))
        {
            return Err(format!("holder {h:?} is malformed or listed twice"));
        }
        Ok(s)
    }

    /// Take a slot for `id`. `Ok(true)` if this changed the value,
    /// `Ok(false)` if `id` already held one; `Err` when all are taken.
    pub fn take(&mut self, id: &str) -> Result<bool, String> {
        if self.holders.iter().any(|h| h == id) {
            return Ok(false);
        }
        if self.holders.len() as u64 >= self.total_slots {
            return Err(format!(
                "all {} slot(s) are taken (holders: {})",
                self.total_slots,
                self.holders.join(", ")
            ));
        }
        self.holders.push(id.to_string());
        Ok(true)
    }

    /// Give back `id`'s slot: true if it held one.
    pub fn give_back(&mut self, id: &str) -> bool {
        let before = self.holders.len();
        self.holders.retain(|h| h != id);
        self.holders.len() != before
    }
}

/// This host's FleetLock id: an application-specific id derived from the
/// machine id as systemd's `sd_id128_get_machine_app_specific` does
/// (HMAC-SHA256 keyed by the machine id over the application id, the first
/// 16 bytes as a version-4 UUID), so the raw machine id never leaves the
/// host and the id cannot be mapped back to it.
pub fn node_id(machine_id: &str) -> Result<String, String> {
    let mid = machine_id.trim();
    let key = hex::decode(mid)
        .ok()
        .filter(|k| k.len() == 16)
        .ok_or_else(|| format!("{mid:?} is not a machine id (32 hexadecimal digits)"))?;
    let mac = hmac_sha256(&key, &NODE_ID_APP);
    let mut id = [0u8; 16];
    id.copy_from_slice(&mac[..16]);
    // RFC 4122 version 4, variant 1, as systemd does.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(hex::encode(id))
}

/// Nimbus's application id for FleetLock node ids (random, fixed forever:
/// changing it changes every host's id).
const NODE_ID_APP: [u8; 16] = [
    0x6e, 0x1b, 0x3c, 0x5e, 0x8a, 0x27, 0x4f, 0x90, 0xb4, 0x1d, 0x72, 0xc3, 0x09, 0xe5, 0x5a, 0x61,
];

/// HMAC (RFC 2104) over SHA-256, for the 16-byte key and message above.
/// Fifteen lines on top of `sha2` rather than another crate in the
/// contracts, which stay small.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn node_ids_are_uuid4_and_not_the_machine_id() {
        let mid = "0123456789abcdef0123456789abcdef";
        let id = node_id(mid).unwrap();
        assert_eq!(id.len(), 32);
        assert_ne!(id, mid);
        assert_eq!(&id[12..13], "4");
        assert!(matches!(&id[16..17], "8" | "9" | "a" | "b"), "{id}");
        assert_eq!(node_id(&format!("{mid}\n")).unwrap(), id);
        assert_ne!(node_id("1123456789abcdef0123456789abcdef").unwrap(), id);
        assert!(node_id("not-hex").is_err());
        assert!(node_id("0123").is_err());
    }

    #[test]
    fn requests_are_checked() {
        let ok = br#"{"client_params":{"id":"abc","group":"default"}}"#;
        assert_eq!(Request::parse(ok).unwrap(), Request::new("abc", "default"));
        for bad in [
            &br#"{"client_params":{"id":"","group":"default"}}"#[..],
            br#"{"client_params":{"id":"a b","group":"default"}}"#,
            br#"{"client_params":{"id":"a","group":"de/fault"}}"#,
            br#"{"client_params":{"id":"a","group":""}}"#,
            br#"{"client_params":{"id":"a"}}"#,
            br#"{"client_params":{"id":"a","group":"g","x":1}}"#,
            b"[]",
        ] {
            assert!(
                Request::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(Request::parse(&vec![b' '; MAX_BODY + 1]).is_err());
    }

    #[test]
    fn the_semaphore_counts_slots_and_holders() {
        let mut s = Semaphore::parse(br#"{"total_slots":2,"holders":["a"]}"#).unwrap();
        assert_eq!(s.take("a"), Ok(false));
        assert_eq!(s.take("b"), Ok(true));
        assert!(s.take("c").unwrap_err().contains("all 2 slot(s)"));
        assert!(s.give_back("a"));
        assert!(!s.give_back("a"));
        assert_eq!(s.take("c"), Ok(true));
        assert!(Semaphore::parse(br#"{"total_slots":2,"holders":["a","a"]}"#).is_err());
        assert!(Semaphore::parse(br#"{"total_slots":-1,"holders":[]}"#).is_err());
        assert!(Semaphore::parse(b"{").is_err());
    }
}
