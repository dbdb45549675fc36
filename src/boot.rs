//! Boot-time helpers shared by the stage-1/stage-2 `/init` and the
//! mark-good command: finding the Nimbus disk, the verity table of a slot,
//! and the kernel command line contract between the two stages.

use crate::release::{SlotDescriptor, VERITY_BLOCK};

/// `nimbus.usr=PARTUUID=<uuid>` and `nimbus.usrhash=<root>` from a command
/// line: what stage-1 hands to stage-2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage2Args {
    pub partuuid: uuid::Uuid,
    pub root_hash: String,
}

pub fn parse_cmdline(cmdline: &str) -> Option<Stage2Args> {
    let mut partuuid = None;
    let mut root_hash = None;
    for w in cmdline.split_whitespace() {
        if let Some(v) = w.strip_prefix("nimbus.usr=PARTUUID=") {
            partuuid = v.parse().ok();
        } else if let Some(v) = w.strip_prefix("nimbus.usrhash=") {
            root_hash = Some(v.to_string());
        }
    }
    Some(Stage2Args {
        partuuid: partuuid?,
        root_hash: root_hash?,
    })
}

/// Where `nimbus-init mark-good` records a failed health check, relative to
/// the root: on ROOT, so the slot that boots next (the fallback) can read
/// why the one before it was given up. update-engine consumes it.
pub const HEALTH_FAILURE_PATH: &str = "var/lib/nimbus/health-failure.json";

/// A failed boot-health check on an unproven slot: the contract between
/// mark-good, which writes it before rebooting, and update-engine, which
/// reports it as the reason for the rollback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthFailure {
    /// GPT partition number of the slot that failed.
    pub partition: u32,
    pub partuuid: uuid::Uuid,
    /// The version its descriptor named ("unknown" when unreadable).
    pub version: String,
    /// What failed, in words: "required unit foo.service is failed (exit-code)".
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

impl HealthFailure {
    pub fn to_json(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).unwrap_or_default();
        b.push(b'\n');
        b
    }

    pub fn parse(b: &[u8]) -> Result<HealthFailure, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

/// The device-mapper table line for a slot whose data and hash tree share
/// one device (`dev` as "major:minor").
pub fn verity_table(d: &SlotDescriptor, dev: &str) -> (u64, String) {
    let block = u64::from(VERITY_BLOCK);
    let data_blocks = d.data_size / block;
    let sectors = d.data_size / 512;
    let table = format!(
        "1 {dev} {dev} {block} {block} {data_blocks} {} sha256 {} {}",
        d.hash_offset / block,
        hex::encode(d.verity_root),
        hex::encode(d.verity_salt)
    );
    (sectors, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_roundtrip() {
        let a = parse_cmdline("console=ttyS0 nimbus.usr=PARTUUID=6052f078-ef0c-5bb9-b832-df3670f381a3 nimbus.usrhash=ab quiet").unwrap();
        assert_eq!(a.root_hash, "ab");
        assert_eq!(
            a.partuuid.to_string(),
            "6052f078-ef0c-5bb9-b832-df3670f381a3"
        );
        assert_eq!(parse_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn health_failure_roundtrip() {
        let h = HealthFailure {
            partition: 3,
            partuuid: uuid::Uuid::nil(),
            version: "1.2.0".into(),
            reason: "required unit x.service is failed".into(),
            at: 7,
        };
        assert_eq!(HealthFailure::parse(&h.to_json()).unwrap(), h);
        assert!(HealthFailure::parse(b"{}").is_err());
    }

    #[test]
    fn table_matches_veritysetup_semantics() {
        let d = SlotDescriptor {
            version: "1.0.0".parse().unwrap(),
            data_size: 100 * 4096,
            hash_offset: 100 * 4096,
            hash_size: 4096,
            verity_root: [0xab; 32],
            verity_salt: [0xcd; 32],
            created: 0,
            keyid: crate::keys::KeyId([0; 8]),
        };
        let (sectors, t) = verity_table(&d, "254:3");
        assert_eq!(sectors, 800);
        assert_eq!(
            t,
            format!(
                "1 254:3 254:3 4096 4096 100 100 sha256 {} {}",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
    }
}
