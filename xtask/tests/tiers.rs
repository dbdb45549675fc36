//! The tier rule, checked: `#[ignore]` marks the VM tier and nothing else,
//! always with the same reason, so `cargo test` shows the VM tier as
//! ignored and `cargo xtask vmtest` finds exactly it. A test ignored for
//! any other reason (a failure hidden) fails here.

use std::path::{Path, PathBuf};

const REASON: &str = "#[ignore = \"vm tier: cargo xtask vmtest\"]";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_ignore_marks_the_vm_tier_and_nothing_else() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "found only {} sources", files.len());
    let mut wrong = Vec::new();
    let mut vm = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let t = line.trim();
            // This file names the attribute in its own checks.
            if !t.starts_with("#[ignore") {
                continue;
            }
            if t == REASON {
                vm += 1;
            } else {
                wrong.push(format!("{}:{}: {t}", f.display(), n + 1));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "ignored for another reason:\n{}",
        wrong.join("\n")
    );
    // boot (8), e2e, cluster, vagrant, fuzz, hung stage 1.
    assert!(vm >= 12, "only {vm} VM-tier tests found");
}

/// README command 2 is what CI runs: `.ci/run` ends in exactly the line
/// the README gives for the default tier, so neither can drift.
#[test]
fn ci_runs_exactly_the_readmes_test_command() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let command = readme
        .lines()
        .find(|l| l.starts_with("cargo xtask deps && cargo clippy"))
        .expect("README gives the default tier's command");
    let last = ci.lines().rfind(|l| !l.trim().is_empty()).unwrap().trim();
    assert_eq!(last, command, ".ci/run's last line and the README differ");
    assert!(command.ends_with("cargo xtask test"), "{command}");
}
