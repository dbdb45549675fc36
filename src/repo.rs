//! Paths inside a release repository (docs/formats.md, "Release
//! repository"): defined once, for the publisher and every client.

use semver::Version;

pub fn manifest_rel(channel: &str) -> String {
    format!("channels/{channel}.json")
}

pub fn payload_rel(version: &Version) -> String {
    format!("payloads/{version}/usr.img.zst")
}

pub fn stage1_rel(version: &Version, name: &str) -> String {
    format!("payloads/{version}/stage1/{name}")
}

/// The delta index (`nimbus::delta`).
pub fn index_rel(version: &Version) -> String {
    format!("payloads/{version}/usr.index")
}

/// The frame pack the index describes.
pub fn pack_rel(version: &Version) -> String {
    format!("payloads/{version}/usr.pack")
}
