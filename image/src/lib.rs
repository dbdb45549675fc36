//! Nimbus image assembly. Pure format writers (verity, cpio) are separate
//! from the steps that run host tools (mmdebstrap, mkfs.erofs, mkfs.fat,
//! mkfs.ext4, qemu-img); `pipeline` runs the whole build.

use std::path::PathBuf;

pub mod cpio;
pub mod esp;
pub mod pipeline;
pub mod rootfs;
pub mod slice;
pub mod usr;
pub mod verity;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool}: {reason}")]
    Tool { tool: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}
