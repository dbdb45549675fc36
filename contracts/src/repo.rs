//! Paths inside a release repository (docs/formats.md, "Release
//! repository"): defined once, for the publisher and every client.

use semver::Version;

/// Trust rotations, `<n>.json` + signatures ([`crate::chain`]).
pub const TRUST_DIR: &str = "trust";

/// Every signed file's detached signatures sit beside it, named with this
/// appended (manifests, trust sets, the chain's links).
pub const SIG_SUFFIX: &str = ".sig";

/// The signatures' name or URL for a signed file's.
pub fn sig_of(signed: &str) -> String {
    format!("{signed}{SIG_SUFFIX}")
}

/// [`sig_of`] for a path.
pub fn sig_path(signed: &std::path::Path) -> std::path::PathBuf {
    let mut s = signed.as_os_str().to_owned();
    s.push(SIG_SUFFIX);
    s.into()
}

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

/// Raw bytes per zstd frame of a payload (`usr.img.zst`). Frames are
/// independent, so an interrupted download resumes at the last frame
/// boundary the updater recorded instead of decoding from the start;
/// 32 MiB costs well under 1 % of compression ratio against one frame.
pub const PAYLOAD_FRAME_RAW: u64 = 32 << 20;
/// The zstd window of every payload frame: decoders need this much memory,
/// whatever level the release was compressed at.
pub const PAYLOAD_WINDOW_LOG: u32 = 23;
/// What a client accepts: one step of slack; a hostile stream asking for
/// more fails instead of allocating.
pub const PAYLOAD_WINDOW_LOG_MAX: u32 = PAYLOAD_WINDOW_LOG + 1;

/// The frame pack the index describes.
pub fn pack_rel(version: &Version) -> String {
    format!("payloads/{version}/usr.pack")
}
