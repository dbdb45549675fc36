//! Every repository file a document or a comment cites exists: a doc that
//! sends a reader to `updater/src/engine.rs` after a split, or to a design
//! file the repository never held, is a broken contract.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Markdown and Rust files of the repository (not target/ or .git/).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("dir entry");
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().expect("file type").is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "corpus" | "artifacts") {
                sources(&p, out);
            }
        } else if (name.ends_with(".md") || name.ends_with(".rs"))
            && !p.ends_with("tests/tests/docs_cite_real_files.rs")
        {
            out.push(p);
        }
    }
}

/// Tokens shaped like a repository path: `dir/.../name.rs|md|toml|sh`, or a
/// top-level `NAME.md`.
fn cited(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_-./".contains(c);
    for (i, _) in text.match_indices(['.']) {
        let ext_end = text[i + 1..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .map_or(text.len(), |n| i + 1 + n);
        let ext = &text[i + 1..ext_end];
        if !matches!(ext, "rs" | "md" | "toml" | "sh") {
            continue;
        }
        let start = text[..i]
            .rfind(|c: char| !is_path_char(c))
            .map_or(0, |n| n + 1);
        let tok = &text[start..ext_end];
        let before = text[..start].chars().last();
        // Absolute paths, URLs, globs and paths relative to something else
        // (`../`) are not repository citations.
        if tok.starts_with('/')
            || tok.starts_with('.')
            || before.is_some_and(|c| c == ':' || c == '*' || c == '<' || c == '{' || c == '$')
            || tok.contains("//")
        {
            continue;
        }
        let top_doc = !tok.contains('/')
            && ext == "md"
            && tok[..tok.len() - 3]
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c == '-');
        if tok.contains('/') || top_doc {
            out.push(tok.to_string());
        }
    }
    out
}

#[test]
fn every_cited_repository_file_exists() {
    let root = root();
    let mut files = Vec::new();
    sources(&root, &mut files);
    assert!(
        files.len() > 50,
        "found only {} sources under {}",
        files.len(),
        root.display()
    );
    // Where a citation is relative to the file's own crate or folder.
    let mut missing = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        for tok in cited(&text) {
            let bases = f.ancestors().skip(1).take_while(|a| a.starts_with(&root));
            let found =
                root.join(&tok).exists() || bases.into_iter().any(|b| b.join(&tok).exists());
            if !found {
                missing.push(format!(
                    "{}: {tok}",
                    f.strip_prefix(&root).unwrap_or(f).display()
                ));
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "cited but not in the repository:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_citation_finder_finds_what_it_must() {
    let t =
        "see `updater/src/engine.rs` and DESIGN.md, not /etc/x.md or https://a/b.md or docs/*.md";
    assert_eq!(cited(t), vec!["updater/src/engine.rs", "DESIGN.md"]);
}
