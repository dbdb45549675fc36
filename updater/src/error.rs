//! Every way an update can fail, each with a stable `kind` for scripts and
//! a message that names the URL, file, device or key involved.

use std::path::PathBuf;

use nimbus::gpt::GptError;
use nimbus::release::ManifestError;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("updates are disabled (SERVER=disabled in update.conf)")]
    Disabled,
    #[error("GET {url}: cannot connect: {reason}")]
    Connect { url: String, reason: String },
    #[error("GET {url}: no data for {secs} s, giving up (server stalled)")]
    Stalled { url: String, secs: u64 },
    #[error("GET {url}: not done after {secs} s, giving up (a small file must arrive within that; server trickling?)")]
    Deadline { url: String, secs: u64 },
    #[error("GET {url}: server answered HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("channel {channel:?} does not exist on the server (GET {url}: HTTP 404)")]
    UnknownChannel { channel: String, url: String },
    #[error("GET {url}: signature file is missing (HTTP 404); an unsigned manifest is never used")]
    SignatureMissing { url: String },
    #[error("GET {url}: payload is missing on the server (HTTP 404)")]
    PayloadMissing { url: String },
    #[error("GET {url}: {reason}")]
    Network { url: String, reason: String },
    #[error("GET {url}: {reason}")]
    Redirect { url: String, reason: String },
    #[error(
        "GET {url}: the server ignored the Range request (HTTP 200); a delta needs byte ranges"
    )]
    RangeIgnored { url: String },
    #[error("GET {url}: asked for bytes {start}-{end}, {got}")]
    RangeMismatch {
        url: String,
        start: u64,
        end: u64,
        got: String,
    },
    #[error("delta source {path}: {reason}")]
    DeltaSource { path: PathBuf, reason: String },
    #[error("delta index {url}: {reason}")]
    DeltaIndex { url: String, reason: String },
    #[error("delta pack {url}: frame {frame} {reason}")]
    DeltaFrame {
        url: String,
        frame: usize,
        reason: String,
    },
    #[error("GET {url}: response is larger than the {limit}-byte limit")]
    ResponseTooLarge { url: String, limit: usize },
    #[error("manifest {url}: {source}")]
    Manifest { url: String, source: ManifestError },
    #[error("trust set {url}: {source}")]
    Trust {
        url: String,
        source: nimbus::trust::TrustError,
    },
    #[error(
        "payload {url}: ended after {got} of the {expected} bytes the manifest lists (truncated)"
    )]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("payload {url}: more than the {expected} bytes the manifest lists")]
    PayloadTooLarge { url: String, expected: u64 },
    #[error("release {version}: {raw_size} bytes do not fit USR partition {partition} ({slot_size} bytes)")]
    TooLargeForSlot {
        version: String,
        raw_size: u64,
        partition: u32,
        slot_size: u64,
    },
    #[error("payload {url}: decodes to more than the {expected} bytes the manifest lists")]
    RawTooLarge { url: String, expected: u64 },
    #[error("payload {url}: decodes to {got} bytes, the manifest lists {expected}")]
    RawTooShort {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error(
        "payload {url}: sha256 of the downloaded bytes is {got}, the manifest lists {expected}"
    )]
    CompressedHash {
        url: String,
        got: String,
        expected: String,
    },
    #[error("payload {url}: sha256 of the decoded slot is {got}, the manifest lists {expected}")]
    RawHash {
        url: String,
        got: String,
        expected: String,
    },
    #[error("payload {url}: not a valid zstd stream: {reason}")]
    Decode { url: String, reason: String },
    #[error("{disk} partition {partition}: written slot rejected: {reason}")]
    Descriptor {
        disk: PathBuf,
        partition: u32,
        reason: String,
    },
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to write partition {partition} of {disk}: it is the booted slot")]
    BootedSlot { disk: PathBuf, partition: u32 },
    #[error("cannot find the booted slot: {0}")]
    NoBootedSlot(String),
    #[error("channel {channel:?} offers {offered}, older than the running {running}; switching needs --allow-downgrade")]
    Downgrade {
        channel: String,
        offered: String,
        running: String,
    },
    #[error("the running slot {slot} is not marked good yet: installing now would overwrite {other}, the slot to fall back to (waiting for nimbus-mark-good)")]
    Unproven { slot: String, other: String },
    #[error("{0}")]
    Refused(String),
    #[error("cancelled by the operator")]
    Cancelled,
    #[error("the slot writer stopped")]
    WriterStopped,
}

impl UpdateError {
    /// A stable name for scripts and the status API.
    pub fn kind(&self) -> &'static str {
        use UpdateError::*;
        match self {
            Config { .. } => "config",
            Disabled => "disabled",
            Connect { .. } => "connect",
            Stalled { .. } => "stalled",
            Deadline { .. } => "deadline",
            Http { .. } => "http-status",
            UnknownChannel { .. } => "unknown-channel",
            SignatureMissing { .. } => "signature-missing",
            PayloadMissing { .. } => "payload-missing",
            Network { .. } => "network",
            Redirect { .. } => "redirect-refused",
            RangeIgnored { .. } => "range-ignored",
            RangeMismatch { .. } => "range-mismatch",
            DeltaIndex { .. } => "delta-index",
            DeltaSource { .. } => "delta-source",
            DeltaFrame { .. } => "delta-frame",
            ResponseTooLarge { .. } => "response-too-large",
            Manifest { source, .. } => manifest_kind(source),
            Trust { source, .. } => trust_kind(source),
            Truncated { .. } => "payload-truncated",
            PayloadTooLarge { .. } => "payload-too-large",
            TooLargeForSlot { .. } => "payload-exceeds-slot",
            RawTooLarge { .. } => "raw-too-large",
            RawTooShort { .. } => "raw-too-short",
            CompressedHash { .. } => "compressed-hash-mismatch",
            RawHash { .. } => "raw-hash-mismatch",
            Decode { .. } => "payload-decode",
            Descriptor { .. } => "slot-descriptor",
            Gpt(_) => "gpt",
            Io { .. } => "io",
            BootedSlot { .. } => "booted-slot",
            NoBootedSlot(_) => "no-booted-slot",
            Downgrade { .. } => "downgrade-refused",
            Unproven { .. } => "booted-unproven",
            Refused(_) => "refused",
            Cancelled => "cancelled",
            WriterStopped => "io",
        }
    }

    /// Process exit code: 2 configuration, 3 network, 4 verification,
    /// 5 disk, 6 policy refusal, 7 cancelled.
    pub fn exit_code(&self) -> u8 {
        use UpdateError::*;
        match self {
            Config { .. } => 2,
            Connect { .. }
            | Stalled { .. }
            | Deadline { .. }
            | Http { .. }
            | UnknownChannel { .. }
            | PayloadMissing { .. }
            | RangeIgnored { .. }
            | Network { .. }
            | Redirect { .. } => 3,
            SignatureMissing { .. }
            | ResponseTooLarge { .. }
            | Manifest { .. }
            | Trust { .. }
            | Truncated { .. }
            | PayloadTooLarge { .. }
            | RawTooLarge { .. }
            | RawTooShort { .. }
            | CompressedHash { .. }
            | RawHash { .. }
            | Decode { .. }
            | RangeMismatch { .. }
            | DeltaIndex { .. }
            | DeltaFrame { .. }
            | Descriptor { .. } => 4,
            TooLargeForSlot { .. }
            | Gpt(_)
            | Io { .. }
            | BootedSlot { .. }
            | NoBootedSlot(_)
            | DeltaSource { .. }
            | WriterStopped => 5,
            Disabled | Downgrade { .. } | Unproven { .. } | Refused(_) => 6,
            Cancelled => 7,
        }
    }
}

fn trust_kind(e: &nimbus::trust::TrustError) -> &'static str {
    use nimbus::trust::TrustError as T;
    match e {
        T::Older { .. } => "trust-older",
        T::Gap { .. } => "trust-gap",
        T::NotVouched { .. } => "trust-not-vouched",
        T::NotSelfSigned { .. } => "trust-not-self-signed",
        T::Io { .. } | T::TooLarge { .. } | T::Parse(_) | T::Schema(_) | T::Invalid(_) => {
            "trust-malformed"
        }
    }
}

fn manifest_kind(e: &ManifestError) -> &'static str {
    use nimbus::release::VerifyError as V;
    match e {
        ManifestError::TooLarge { .. } => "manifest-too-large",
        ManifestError::Parse(_) | ManifestError::Invalid(_) | ManifestError::Schema(_) => {
            "manifest-malformed"
        }
        ManifestError::ChannelMismatch { .. } => "manifest-channel-mismatch",
        ManifestError::Expired { .. } => "manifest-expired",
        ManifestError::Rollback { .. } => "manifest-replayed",
        ManifestError::Signature(v) => match v {
            V::UntrustedKey { .. } => "untrusted-key",
            V::BadSignature { .. } | V::WrongKey { .. } | V::SignatureLength { .. } => {
                "bad-signature"
            }
            V::Threshold { .. } => "signature-threshold",
            V::SignatureFile(_) => "signature-malformed",
        },
    }
}

pub fn io_at(p: &std::path::Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: p.to_path_buf(),
        source,
    }
}
