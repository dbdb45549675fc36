//! `cloud-config`: validate and apply CoreOS-style `#cloud-config` user-data.
//!
//! - [`yaml`]: a line-numbered YAML tree under hard limits (size, depth,
//!   alias expansion).
//! - [`schema`]: the coreos-cloudinit schema; every problem with its line.
//! - [`apply`]: writes into a root directory, confined to it, idempotently.
//! - [`sources`]: where user-data comes from at boot.
//! - [`subst`]: `$public_ipv4` and friends replaced before parsing, from
//!   the addresses [`addresses`] finds.

pub mod addresses;
pub mod apply;
pub mod schema;
pub mod sources;
pub mod subst;
pub mod yaml;

use std::io::Read;
use std::path::Path;

/// Read a user-data file without ever holding more than the parser's limit.
pub fn read_limited(path: &Path) -> Result<String, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    f.take(yaml::MAX_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if buf.len() > yaml::MAX_BYTES {
        return Err(format!(
            "{}: larger than the {}-byte limit for user-data",
            path.display(),
            yaml::MAX_BYTES
        ));
    }
    String::from_utf8(buf).map_err(|e| {
        format!(
            "{}: not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}
