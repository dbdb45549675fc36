//! A host as update-engine sees it, without a VM: a sparse disk with
//! Nimbus's GPT (USR slots with their priority bits and, if given, a sealed
//! USR in each) and a root directory with the trust set and update.conf.
//! The updater's tests, the power-cut harness and the update benchmarks
//! all start from these.

use std::fs;
use std::path::{Path, PathBuf};

use nimbus::gpt::Disk;
use nimbus::layout::{self, Slot};
use nimbus::slots::Prio;
use nimbus_image::usr::UsrSlot;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// One USR slot at creation: its GPT priority bits and what it holds.
#[derive(Clone, Copy)]
pub struct SlotInit<'a> {
    pub prio: Prio,
    pub usr: Option<&'a UsrSlot>,
}

impl<'a> SlotInit<'a> {
    /// A slot nothing boots (0/0/0), left empty.
    pub const EMPTY: SlotInit<'static> = SlotInit {
        prio: Prio {
            priority: 0,
            tries: 0,
            successful: false,
        },
        usr: None,
    };

    /// A known-good slot (`priority`/0/1) holding `usr`, if any.
    pub fn good(priority: u8, usr: Option<&'a UsrSlot>) -> SlotInit<'a> {
        SlotInit {
            prio: Prio {
                priority,
                tries: 0,
                successful: true,
            },
            usr,
        }
    }
}

/// Make `path` a sparse Nimbus disk with slots of `usr_size` bytes, its
/// GUIDs derived from `guid_seed` (disk `seed`, partition N `seed*10+N`)
/// so that two fixtures of one test differ and a rerun is the same.
/// The file is synced before this returns.
pub fn disk(
    path: &Path,
    usr_size: u64,
    guid_seed: u128,
    a: SlotInit<'_>,
    b: SlotInit<'_>,
) -> Result<PathBuf, Error> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(layout::min_disk_size(usr_size))?;
    let prio = |n: u32| {
        if n == Slot::A.partition_number() {
            a.prio.apply_to(0)
        } else if n == Slot::B.partition_number() {
            b.prio.apply_to(0)
        } else {
            0
        }
    };
    let d = Disk::create(
        f,
        path,
        usr_size,
        uuid::Uuid::from_u128(guid_seed),
        |s| uuid::Uuid::from_u128(guid_seed * 10 + u128::from(s.number)),
        |s| prio(s.number),
    )?;
    let parts = [
        (d.partition(Slot::A.partition_number())?, a.usr),
        (d.partition(Slot::B.partition_number())?, b.usr),
    ];
    let mut f = d.into_device();
    for (p, usr) in parts {
        if let Some(usr) = usr {
            usr.write_to_partition(&mut f, path, p.offset_bytes(), p.size_bytes())?;
        }
    }
    f.sync_all()?;
    Ok(path.to_path_buf())
}

/// Make `dir` a host root: the trust set USR ships (`trust`, a build's
/// trust.json) at its place under usr/, and etc/nimbus/update.conf with
/// `update_conf`.
pub fn root(dir: &Path, trust: &[u8], update_conf: &str) -> Result<PathBuf, Error> {
    let trust_at = dir.join(nimbus::paths::TRUST_USR);
    let conf = dir.join(nimbus::paths::UPDATE_CONF_ETC);
    for p in [&trust_at, &conf] {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
    }
    fs::write(&trust_at, trust).map_err(|e| format!("{}: {e}", trust_at.display()))?;
    fs::write(&conf, update_conf).map_err(|e| format!("{}: {e}", conf.display()))?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_has_the_asked_slot_bits_by_cgpt() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("d.raw");
        disk(
            &p,
            64 << 20,
            3,
            SlotInit::good(2, None),
            SlotInit {
                prio: Prio {
                    priority: 1,
                    tries: 3,
                    successful: false,
                },
                usr: None,
            },
        )
        .unwrap();
        assert_eq!(crate::cgpt::attrs(&p, 3), (2, 0, 1));
        assert_eq!(crate::cgpt::attrs(&p, 4), (1, 3, 0));
        let v = std::process::Command::new("sgdisk")
            .arg("-v")
            .arg(&p)
            .output()
            .expect("sgdisk (cargo xtask deps installs it)");
        let v = String::from_utf8_lossy(&v.stdout);
        assert!(v.contains("No problems found"), "{v}");
    }

    #[test]
    fn a_root_holds_the_trust_set_and_update_conf() {
        let t = tempfile::tempdir().unwrap();
        let r = root(&t.path().join("root"), b"{}", "GROUP=stable\n").unwrap();
        assert_eq!(fs::read(r.join(nimbus::paths::TRUST_USR)).unwrap(), b"{}");
        assert_eq!(
            fs::read_to_string(r.join(nimbus::paths::UPDATE_CONF_ETC)).unwrap(),
            "GROUP=stable\n"
        );
        // A root under a file cannot be made, and the error names where.
        fs::write(t.path().join("file"), b"").unwrap();
        let e = root(&t.path().join("file/r"), b"{}", "").unwrap_err();
        assert!(e.to_string().contains("file/r"), "{e}");
    }
}
