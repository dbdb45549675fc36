//! What the binary's integration tests share.

use std::path::Path;
use std::process::{Command, Output};

/// The real `cloud-config` binary with `args`.
pub fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-config"))
        .args(args)
        .output()
        .unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
