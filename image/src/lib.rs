//! Nimbus image assembly. Pure format writers (verity, cpio) are separate
//! from the steps that run host tools (mmdebstrap, mkfs.erofs, mkfs.fat,
//! mkfs.ext4, qemu-img); `pipeline` runs the whole build.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod bios;
pub mod cpio;
pub mod delta;
pub mod esp;
pub mod pipeline;
pub mod release;
pub mod rootfs;
pub mod slice;
pub mod usr;
pub use nimbus::verity;

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

/// Run a host tool; a failure carries its stderr, a missing tool says how
/// to install it.
pub fn run_tool(cmd: &mut Command, what: &str) -> Result<(), ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Tool {
        tool: what.into(),
        reason: format!("cannot run it ({e}); `cargo xtask deps` installs it"),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: what.into(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// What a tree copy keeps of the source's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metadata {
    /// Modes, owners, timestamps, links (`cp -a`): a root filesystem.
    Keep,
    /// Fresh files owned by the caller (`--no-preserve=all`): an image
    /// handed out of the cache, which the user may then change or delete.
    Fresh,
}

/// Copy the contents of `from` into the directory `to` (created if need
/// be), with `cp`: reflinked where the filesystem can, sparse where it
/// cannot (a 3 GiB raw image is mostly holes). What `to` held already
/// stays unless a copied file replaces it.
pub fn copy_tree(from: &Path, to: &Path, meta: Metadata) -> Result<(), ImageError> {
    std::fs::create_dir_all(to).map_err(|source| ImageError::Io {
        path: to.to_path_buf(),
        source,
    })?;
    let keep = match meta {
        Metadata::Keep => "-a",
        Metadata::Fresh => "--no-preserve=all",
    };
    run_tool(
        Command::new("cp")
            .args(["-R", keep, "--reflink=auto", "--sparse=always"])
            .arg(from.join("."))
            .arg(to),
        &format!("cp -R {} {}", from.display(), to.display()),
    )
}

pub fn sha256_file(p: &Path) -> Result<String, ImageError> {
    use sha2::Digest;
    let mut f = std::fs::File::open(p).map_err(|source| ImageError::Io {
        path: p.to_path_buf(),
        source,
    })?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| ImageError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
