//! The trust-chain store: the rotations after a built-in trust set, as
//! `<n>.json` + `<n>.json.sig` pairs in one directory, wherever that
//! directory is (docs/security.md, "Rotating keys"):
//!
//! | where | directory | reached through | written by | read by |
//! |---|---|---|---|---|
//! | a release repository | [`crate::repo::TRUST_DIR`] | [`PublishDir`] | `cargo xtask release --rotate` | the release tool (and update-engine over HTTP) |
//! | ROOT | [`crate::paths::TRUST_CHAIN_ROOT`] | [`DirEsp`] on `/` | update-engine, as it learns | update-engine |
//! | the ESP | [`crate::esp::CHAIN_DIR`] | any [`crate::esp::Esp`] | update-engine, once the booted slot is good | stage 1, update-engine |
//!
//! One rule for every reader: links are taken in version order from the
//! lowest; only canonical names count (`2.json`, not `02.json`); a set
//! whose signatures file is missing, or the set itself missing, ends the
//! chain there (a cut between the two writes; the next write makes it
//! whole). Whether each link is vouched for is [`crate::trust::walk`]'s
//! to check, not the store's.

use std::path::PathBuf;

use crate::esp::{DirEsp, EspError, EspFs};
use crate::trust::{chain_file, Link, MAX_CHAIN, MAX_TRUST_BYTES};

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The chain stored in `dir` (relative to `fs`'s root), by the rule above.
pub fn read(fs: &dyn EspFs, dir: &str) -> Result<Vec<Link>, EspError> {
    let mut versions: Vec<u64> = fs
        .list(dir)?
        .iter()
        .filter_map(|n| {
            let v: u64 = n.strip_suffix(".json")?.parse().ok()?;
            (chain_file(v) == *n).then_some(v)
        })
        .collect();
    versions.sort_unstable();
    versions.truncate(MAX_CHAIN);
    let mut out: Vec<Link> = Vec::new();
    for v in versions {
        // A missing set (a gap in the numbers) ends the chain like a
        // missing signature does.
        if out.last().is_some_and(|l| l.version + 1 != v) {
            break;
        }
        let set = join(dir, &chain_file(v));
        // A link that cannot be read whole (a damaged file, one larger than
        // a link may be) ends the chain there like a missing one: the links
        // before it still count. Failing the whole read instead would send
        // stage 1 back to its built-in set, which after a rotation trusts
        // neither slot.
        let Ok(Some(sigs)) = fs.read(
            &crate::repo::sig_of(&set),
            crate::release::MAX_SIGNATURES_BYTES,
        ) else {
            break;
        };
        let Ok(Some(bytes)) = fs.read(&set, MAX_TRUST_BYTES) else {
            break;
        };
        out.push(Link {
            version: v,
            bytes,
            sigs,
        });
    }
    Ok(out)
}

/// Add links to `dir`: each set, then its signatures, as new files (a
/// reader that meets a set without its signatures stops before it).
pub fn write(fs: &dyn EspFs, dir: &str, links: &[Link]) -> Result<(), EspError> {
    for l in links {
        let set = join(dir, &chain_file(l.version));
        fs.write_new(&set, &l.bytes)?;
        fs.write_new(&crate::repo::sig_of(&set), &l.sigs)?;
    }
    Ok(())
}

/// Write damaged links again, each set and then its signatures, over
/// what is there (the files exist, so `replace`; the set first, so that a
/// cut between the two leaves a set whose signatures do not match, which
/// ends the chain there as before).
pub fn repair(fs: &dyn EspFs, dir: &str, links: &[Link]) -> Result<(), EspError> {
    for l in links {
        let set = join(dir, &chain_file(l.version));
        fs.replace(&set, &l.bytes)?;
        fs.replace(&crate::repo::sig_of(&set), &l.sigs)?;
    }
    Ok(())
}

/// A directory served to others while it is written (a release
/// repository): every new file appears whole, by rename, and a published
/// name is never written again.
pub struct PublishDir(pub PathBuf);

impl EspFs for PublishDir {
    fn read(&self, rel: &str, limit: usize) -> Result<Option<Vec<u8>>, EspError> {
        DirEsp(self.0.clone()).read(rel, limit)
    }
    fn list(&self, rel_dir: &str) -> Result<Vec<String>, EspError> {
        DirEsp(self.0.clone()).list(rel_dir)
    }
    fn replace(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        DirEsp(self.0.clone()).replace(rel, data)
    }
    fn write_new(&self, rel: &str, data: &[u8]) -> Result<(), EspError> {
        if self.0.join(rel).symlink_metadata().is_ok() {
            return Err(EspError::Invalid(format!(
                "{}: exists; a published file is immutable",
                self.0.join(rel).display()
            )));
        }
        self.replace(rel, data)
    }
    fn rename(&self, from: &str, to: &str) -> Result<(), EspError> {
        DirEsp(self.0.clone()).rename(from, to)
    }
    fn remove(&self, rel: &str) -> Result<(), EspError> {
        DirEsp(self.0.clone()).remove(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(v: u64) -> Link {
        Link {
            version: v,
            bytes: format!("set {v}").into_bytes(),
            sigs: format!("sigs {v}").into_bytes(),
        }
    }

    #[test]
    fn every_place_reads_back_what_was_written_in_order() {
        let d = tempfile::tempdir().unwrap();
        for (fs, dir) in [
            (
                Box::new(DirEsp(d.path().join("esp"))) as Box<dyn EspFs>,
                crate::esp::CHAIN_DIR,
            ),
            (
                Box::new(DirEsp(d.path().join("root"))),
                crate::paths::TRUST_CHAIN_ROOT,
            ),
            (
                Box::new(PublishDir(d.path().join("repo"))),
                crate::repo::TRUST_DIR,
            ),
            (Box::new(DirEsp(d.path().join("flat"))), ""),
        ] {
            assert!(read(&*fs, dir).unwrap().is_empty(), "{dir}: not empty");
            write(&*fs, dir, &[link(3), link(2)]).unwrap();
            write(&*fs, dir, &[link(4)]).unwrap();
            let got: Vec<u64> = read(&*fs, dir).unwrap().iter().map(|l| l.version).collect();
            assert_eq!(got, vec![2, 3, 4], "{dir}");
            assert_eq!(read(&*fs, dir).unwrap()[0], link(2));
        }
        assert!(d.path().join("flat/2.json.sig").is_file());
        assert!(d.path().join("repo/trust/4.json").is_file());
    }

    #[test]
    fn a_torn_or_missing_link_ends_the_chain_and_odd_names_do_not_count() {
        let d = tempfile::tempdir().unwrap();
        let fs = DirEsp(d.path().to_path_buf());
        write(&fs, "c", &[link(2), link(3), link(4)]).unwrap();
        // 3's signatures never landed; 02.json and notes are not links.
        std::fs::remove_file(d.path().join("c/3.json.sig")).unwrap();
        std::fs::write(d.path().join("c/02.json"), b"x").unwrap();
        std::fs::write(d.path().join("c/02.json.sig"), b"x").unwrap();
        std::fs::write(d.path().join("c/notes.txt"), b"x").unwrap();
        let got: Vec<u64> = read(&fs, "c").unwrap().iter().map(|l| l.version).collect();
        assert_eq!(got, vec![2]);
        // A signature without its set ends it the same way.
        std::fs::write(d.path().join("c/3.json.sig"), b"s").unwrap();
        std::fs::remove_file(d.path().join("c/3.json")).unwrap();
        let got: Vec<u64> = read(&fs, "c").unwrap().iter().map(|l| l.version).collect();
        assert_eq!(got, vec![2]);
        // An oversized set ends the chain at itself (refused, not
        // truncated); the links before it still count.
        write(&fs, "d", &[link(2), link(3), link(4)]).unwrap();
        std::fs::write(d.path().join("d/3.json"), vec![b' '; MAX_TRUST_BYTES + 1]).unwrap();
        let got: Vec<u64> = read(&fs, "d").unwrap().iter().map(|l| l.version).collect();
        assert_eq!(got, vec![2]);
        std::fs::write(d.path().join("d/2.json"), vec![b' '; MAX_TRUST_BYTES + 1]).unwrap();
        assert!(read(&fs, "d").unwrap().is_empty());
    }

    #[test]
    fn a_published_link_is_never_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let fs = PublishDir(d.path().to_path_buf());
        write(&fs, crate::repo::TRUST_DIR, &[link(2)]).unwrap();
        let e = write(&fs, crate::repo::TRUST_DIR, &[link(2)]).unwrap_err();
        assert!(e.to_string().contains("immutable"), "{e}");
        assert_eq!(read(&fs, crate::repo::TRUST_DIR).unwrap(), vec![link(2)]);
    }
}
