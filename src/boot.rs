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
