//! Power cuts in file writes: update-engine's state file and update.conf,
//! cloud-config's files and links. The real code runs against a real
//! directory while `nimbus::durable` records each step (write, fsync,
//! rename, directory fsync); the trace is then cut before every step and
//! replayed under a conservative crash model:
//!
//! - a file's bytes are durable only after its fsync; before that a crash
//!   leaves none, some (torn) or all of them;
//! - a rename or a new symlink is durable only after its directory's
//!   fsync; before that it may or may not have happened.
//!
//! After each cut every file the code replaced must hold its old value or
//! one complete new value, and never one older than the last durable one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nimbus::durable::FsEvent;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File(Vec<u8>),
    Link(PathBuf),
}

/// Everything under `root`, before the code runs.
pub fn snapshot(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, Node>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            if m.file_type().is_symlink() {
                out.insert(p.clone(), Node::Link(std::fs::read_link(&p)?));
            } else if m.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), Node::File(std::fs::read(&p)?));
            }
        }
    }
    Ok(out)
}

pub struct Report {
    pub points: usize,
    pub mixed: usize,
    /// Distinct files replaced.
    pub files: usize,
    pub failures: Vec<String>,
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

/// Is op `i` durable when the power goes before op `k`?
fn durable(trace: &[FsEvent], i: usize, k: usize) -> bool {
    let later = &trace[i + 1..k];
    match &trace[i] {
        // Temp names are reused by later writes (a new inode each time):
        // only a sync before the name is written again covers this one.
        FsEvent::Write { path, .. } => later
            .iter()
            .take_while(|e| !matches!(e, FsEvent::Write { path: p, .. } if p == path))
            .any(|e| matches!(e, FsEvent::SyncFile { path: p } if p == path)),
        FsEvent::Symlink { path, .. } => later
            .iter()
            .any(|e| matches!(e, FsEvent::SyncDir { dir } if dir == parent(path))),
        FsEvent::Rename { to, .. } => later
            .iter()
            .any(|e| matches!(e, FsEvent::SyncDir { dir } if dir == parent(to))),
        FsEvent::Remove { path } => later
            .iter()
            .any(|e| matches!(e, FsEvent::SyncDir { dir } if dir == parent(path))),
        FsEvent::Overwrite { path, .. } => later
            .iter()
            .any(|e| matches!(e, FsEvent::SyncFile { path: p } if p == path)),
        FsEvent::SyncFile { .. } | FsEvent::SyncDir { .. } => true,
    }
}

/// How a non-durable op landed in one crash variant.
#[derive(Clone, Copy, PartialEq)]
enum Landed {
    No,
    Torn,
    Yes,
}

/// The whole new value each write op carries (by its temp path's op index).
fn written(trace: &[FsEvent], from: &Path, before: usize) -> Option<Node> {
    trace[..before].iter().rev().find_map(|e| match e {
        FsEvent::Write { path, data } if path == from => Some(Node::File(data.clone())),
        FsEvent::Symlink { path, target } if path == from => Some(Node::Link(target.clone())),
        _ => None,
    })
}

/// Cut `trace` before every op, in `variants` ways each, and hand each
/// resulting set of names to `f` (the cut point, then the names).
/// With `vfat`, a rename that landed leaves an empty file at its target
/// until the target is fsynced again (Linux's vfat writes the new entry
/// with size 0 and fills it in at inode writeback).
pub fn each_cut(
    trace: &[FsEvent],
    initial: &BTreeMap<PathBuf, Node>,
    variants: usize,
    seed: u64,
    vfat: bool,
    mut f: impl FnMut(usize, usize, &BTreeMap<PathBuf, Node>),
) {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for k in 0..=trace.len() {
        let pending: Vec<usize> = (0..k).filter(|&i| !durable(trace, i, k)).collect();
        for variant in 0..variants {
            let names = replay(trace, initial, k, &pending, variant, vfat, &mut next);
            f(k, variant, &names);
        }
    }
}

fn replay(
    trace: &[FsEvent],
    initial: &BTreeMap<PathBuf, Node>,
    k: usize,
    pending: &[usize],
    variant: usize,
    vfat: bool,
    next: &mut impl FnMut() -> u64,
) -> BTreeMap<PathBuf, Node> {
    let landed = |i: usize, r: u64| -> Landed {
        if !pending.contains(&i) {
            return Landed::Yes;
        }
        match variant {
            0 => Landed::No,
            1 => Landed::Yes,
            // Everything but the last pending op, which is torn.
            2 if pending.last() == Some(&i) => Landed::Torn,
            2 => Landed::Yes,
            _ => match r % 3 {
                0 => Landed::No,
                1 => Landed::Torn,
                _ => Landed::Yes,
            },
        }
    };
    let mut names: BTreeMap<PathBuf, Node> = initial.clone();
    for (i, e) in trace[..k].iter().enumerate() {
        let l = landed(i, next());
        match e {
            FsEvent::Write { path, data } => {
                let bytes = match l {
                    Landed::No => Vec::new(),
                    Landed::Torn => data[..data.len() / 2].to_vec(),
                    Landed::Yes => data.clone(),
                };
                names.insert(path.clone(), Node::File(bytes));
            }
            FsEvent::Symlink { path, target } => {
                if l != Landed::No {
                    names.insert(path.clone(), Node::Link(target.clone()));
                }
            }
            FsEvent::Rename { from, to } => {
                if l != Landed::No {
                    if let Some(n) = names.remove(from) {
                        let settled = trace[i + 1..k]
                            .iter()
                            .any(|e| matches!(e, FsEvent::SyncFile { path } if path == to));
                        let n = if vfat && !settled {
                            Node::File(Vec::new())
                        } else {
                            n
                        };
                        names.insert(to.clone(), n);
                    }
                }
            }
            FsEvent::Remove { path } => {
                if l != Landed::No {
                    names.remove(path);
                }
            }
            FsEvent::Overwrite { path, data } => {
                let old = match names.get(path) {
                    Some(Node::File(b)) => b.clone(),
                    _ => Vec::new(),
                };
                let bytes = match l {
                    Landed::No => old,
                    // Sector by sector: the first new, the rest old.
                    Landed::Torn => {
                        let mut b = old;
                        b.resize(data.len(), 0);
                        let n = data.len().min(512);
                        b[..n].copy_from_slice(&data[..n]);
                        b
                    }
                    Landed::Yes => data.clone(),
                };
                names.insert(path.clone(), Node::File(bytes));
            }
            FsEvent::SyncFile { .. } | FsEvent::SyncDir { .. } => {}
        }
    }
    names
}

/// An ESP as a set of names after a cut, for `nimbus::esp`'s loader rules.
struct MapEsp<'a> {
    root: &'a Path,
    names: &'a BTreeMap<PathBuf, Node>,
}

impl nimbus::esp::EspFs for MapEsp<'_> {
    fn read(&self, rel: &str, _limit: usize) -> Result<Option<Vec<u8>>, nimbus::esp::EspError> {
        Ok(match self.names.get(&self.root.join(rel)) {
            Some(Node::File(b)) => Some(b.clone()),
            _ => None,
        })
    }
    fn list(&self, rel_dir: &str) -> Result<Vec<String>, nimbus::esp::EspError> {
        let d = self.root.join(rel_dir);
        Ok(self
            .names
            .keys()
            .filter(|p| p.parent() == Some(d.as_path()))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
    fn replace(&self, _: &str, _: &[u8]) -> Result<(), nimbus::esp::EspError> {
        Err(nimbus::esp::EspError::Invalid("read-only view".into()))
    }
    fn rename(&self, _: &str, _: &str) -> Result<(), nimbus::esp::EspError> {
        Err(nimbus::esp::EspError::Invalid("read-only view".into()))
    }
    fn remove(&self, _: &str) -> Result<(), nimbus::esp::EspError> {
        Err(nimbus::esp::EspError::Invalid("read-only view".into()))
    }
}

pub struct EspReport {
    pub points: usize,
    pub unbootable: usize,
    pub failures: Vec<String>,
}

/// Cut a stage-1 update of the ESP at `root` everywhere: after each cut,
/// the copy systemd-boot would start and the copy GRUB would start must
/// each hold one whole stage 1 (`whole`: the (kernel, initramfs) pairs a
/// copy may hold). A grubenv that does not parse counts as GRUB's default.
pub fn esp_check(
    trace: &[FsEvent],
    initial: &BTreeMap<PathBuf, Node>,
    root: &Path,
    whole: &[(Vec<u8>, Vec<u8>)],
    variants: usize,
    seed: u64,
) -> EspReport {
    let mut r = EspReport {
        points: 0,
        unbootable: 0,
        failures: Vec::new(),
    };
    each_cut(trace, initial, variants, seed, true, |k, variant, names| {
        r.points += 1;
        let fs = MapEsp { root, names };
        let complete = |c: nimbus::esp::Copy| -> bool {
            use nimbus::esp::EspFs;
            match (fs.read(&c.kernel(), 0), fs.read(&c.initramfs(), 0)) {
                (Ok(Some(k)), Ok(Some(i))) => whole.iter().any(|(wk, wi)| *wk == k && *wi == i),
                _ => false,
            }
        };
        let sd = nimbus::esp::entries(&fs)
            .ok()
            .and_then(|e| nimbus::esp::sdboot_boot(&e))
            .map(|(e, _)| e.copy);
        let grub = nimbus::esp::grubenv(&fs)
            .map(|g| g.grub_boot().0)
            .unwrap_or(nimbus::esp::Copy::A);
        let mut bad = Vec::new();
        match sd {
            Some(c) if complete(c) => {}
            Some(c) => bad.push(format!("systemd-boot starts copy {c}, which is not whole")),
            None => bad.push("systemd-boot finds no entry".to_string()),
        }
        if !complete(grub) {
            bad.push(format!("GRUB starts copy {grub}, which is not whole"));
        }
        if !bad.is_empty() {
            r.unbootable += 1;
            if r.failures.len() < 10 {
                r.failures.push(format!(
                    "cut before op {k} variant {variant}: {}",
                    bad.join("; ")
                ));
            }
        }
    });
    r
}

/// Cut `trace` before every op, in `variants` ways each.
pub fn check(
    trace: &[FsEvent],
    initial: &BTreeMap<PathBuf, Node>,
    variants: usize,
    seed: u64,
) -> Report {
    let targets: std::collections::BTreeSet<&PathBuf> = trace
        .iter()
        .filter_map(|e| match e {
            FsEvent::Rename { to, .. } => Some(to),
            _ => None,
        })
        .collect();
    let mut report = Report {
        points: 0,
        mixed: 0,
        files: targets.len(),
        failures: Vec::new(),
    };
    each_cut(
        trace,
        initial,
        variants,
        seed,
        false,
        |k, variant, names| {
            report.points += 1;
            let mut bad = Vec::new();
            for t in &targets {
                // Allowed: the value after the last durable rename into t
                // (or the initial one), or any later complete value.
                let renames: Vec<usize> = (0..k)
                    .filter(|&i| matches!(&trace[i], FsEvent::Rename { to, .. } if to == *t))
                    .collect();
                let last_durable = renames.iter().rev().find(|&&i| durable(trace, i, k));
                let mut allowed: Vec<Option<Node>> = Vec::new();
                let value_of = |i: usize| match &trace[i] {
                    FsEvent::Rename { from, .. } => written(trace, from, i),
                    _ => None,
                };
                match last_durable {
                    Some(&i) => allowed.push(value_of(i)),
                    None => allowed.push(initial.get(*t).cloned()),
                }
                for &i in renames
                    .iter()
                    .filter(|&&i| last_durable.is_none_or(|&d| i > d))
                {
                    allowed.push(value_of(i));
                }
                let got = names.get(*t).cloned();
                if !allowed.contains(&got) {
                    bad.push(format!(
                        "{}: {}",
                        t.display(),
                        match &got {
                            None => "missing".to_string(),
                            Some(Node::File(b)) => format!("{} bytes, no whole version", b.len()),
                            Some(Node::Link(l)) => format!("link to {}", l.display()),
                        }
                    ));
                }
            }
            if !bad.is_empty() {
                report.mixed += 1;
                if report.failures.len() < 10 {
                    report.failures.push(format!(
                        "cut before op {k} variant {variant}: {}",
                        bad.join("; ")
                    ));
                }
            }
        },
    );
    report
}

/// The same trace with every fsync of a file dropped: what the write path
/// would be without "fsync before rename". The harness must see it fail.
pub fn without_file_syncs(trace: &[FsEvent]) -> Vec<FsEvent> {
    trace
        .iter()
        .filter(|e| !matches!(e, FsEvent::SyncFile { .. }))
        .cloned()
        .collect()
}

/// The user-data applied under power cuts: files (new and replaced), an
/// SSH key, update settings, a unit enabled by a link, the hostname.
pub const USER_DATA: &str = r#"#cloud-config
hostname: cut-host
ssh_authorized_keys:
  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKxqdq3K5bAlPZZ2mgqsZ0V9s5rBGxgBq4qg3bQ8mTxW powercut
coreos:
  update:
    group: beta
    reboot-strategy: etcd-lock
  units:
    - name: app.service
      enable: true
      content: |
        [Service]
        ExecStart=/usr/bin/true
        [Install]
        WantedBy=multi-user.target
write_files:
  - path: /etc/app/config.toml
    permissions: "0600"
    content: |
      listen = "0.0.0.0:8080"
      workers = 4
  - path: /etc/motd
    content: |
      replaced by cloud-config
"#;

/// A small ROOT for cloud-config to change.
pub fn cloud_root(dir: &Path) -> anyhow::Result<()> {
    for (p, c) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\nsudo:x:27:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/motd", "the image's motd\n"),
        ("etc/hostname", "localhost\n"),
        ("etc/nimbus/update.conf", "# operator notes\nGROUP=stable\n"),
    ] {
        let p = dir.join(p);
        std::fs::create_dir_all(parent(&p))?;
        std::fs::write(&p, c)?;
    }
    std::fs::create_dir_all(dir.join("home"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(p: &str, d: &[u8]) -> FsEvent {
        FsEvent::Write {
            path: p.into(),
            data: d.to_vec(),
        }
    }
    fn sync(p: &str) -> FsEvent {
        FsEvent::SyncFile { path: p.into() }
    }
    fn mv(a: &str, b: &str) -> FsEvent {
        FsEvent::Rename {
            from: a.into(),
            to: b.into(),
        }
    }
    fn syncdir(p: &str) -> FsEvent {
        FsEvent::SyncDir { dir: p.into() }
    }

    #[test]
    fn the_protocol_passes_and_each_missing_step_fails() {
        let init: BTreeMap<PathBuf, Node> =
            [(PathBuf::from("/d/f"), Node::File(b"old".to_vec()))].into();
        let good = vec![
            w("/d/.f.tmp", b"new1"),
            sync("/d/.f.tmp"),
            mv("/d/.f.tmp", "/d/f"),
            syncdir("/d"),
            w("/d/.f.tmp", b"new2"),
            sync("/d/.f.tmp"),
            mv("/d/.f.tmp", "/d/f"),
            syncdir("/d"),
        ];
        let r = check(&good, &init, 8, 1);
        assert_eq!(r.mixed, 0, "{:?}", r.failures);
        assert_eq!(r.points, 9 * 8);
        // No fsync before the rename: a cut can leave an empty or torn file.
        assert!(check(&without_file_syncs(&good), &init, 8, 1).mixed > 0);
        // A value older than the last durable one is caught too: replaying
        // the second write with its rename lost after the directory fsync.
        let mut lost = good.clone();
        lost[6] = mv("/d/.other", "/d/f");
        assert!(check(&lost, &init, 8, 1).mixed > 0);
    }
}
