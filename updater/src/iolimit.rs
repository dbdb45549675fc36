//! Keeping the slot writer from starving the host's workload.
//!
//! The writer thread (only it) goes into its own blkio cgroup with a
//! `blkio.throttle.write_bps_device` rule for the target disk (cgroup v1,
//! which these hosts run in hybrid mode; the `tasks` file takes thread ids),
//! or, on a pure cgroup v2 host, the process goes into a child cgroup with
//! `io.max` (v2 cannot split a process's threads across domain cgroups).
//! Writes use O_DIRECT, which v1 throttling sees (buffered writeback is not
//! attributed to the writer in v1). Where no controller is usable the writer
//! paces itself in userspace and says so. The unit's `IOWriteBandwidthMax=`
//! is a second line of defence.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgroups_rs::blkio::BlkIoController;
use cgroups_rs::CgroupPid;
use cgroups_rs::{hierarchies, Cgroup};

/// The whole disk (major, minor) that a write to `path` lands on: the device
/// itself for a block device, the filesystem's disk for a file. Throttle
/// rules apply to whole disks, so a partition maps to its parent.
pub fn backing_disk(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path).ok()?;
    let dev = if md.file_type().is_block_device() {
        md.rdev()
    } else {
        md.dev()
    };
    let (maj, min) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    if maj == 0 {
        return None; // tmpfs, overlay: no block device to throttle
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev")).ok()?;
        let (a, b) = parent.trim().split_once(':')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    Some((maj, min))
}

fn gettid() -> u64 {
    nix::unistd::gettid().as_raw() as u64
}

/// Put the calling thread in the idle I/O class (ioprio_set(2)).
pub fn set_idle_class() -> Result<(), std::io::Error> {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub enum Limit {
    None,
    Cgroup {
        cg: Cgroup,
        v2: bool,
    },
    Userspace {
        bps: u64,
        start: Instant,
        bytes: u64,
    },
}

/// What the writer thread runs under; dropping it leaves the cgroup.
pub struct Guard {
    pub limit: Limit,
    /// One line for the log and the status: which mechanism is in force.
    pub how: String,
}

/// Called on the writer thread before its first write.
pub fn enter(target: &Path, bps: Option<u64>, idle: bool) -> Guard {
    let mut notes = Vec::new();
    if idle {
        match set_idle_class() {
            Ok(()) => notes.push("idle I/O class".to_string()),
            Err(e) => notes.push(format!("idle I/O class unavailable ({e})")),
        }
    }
    let Some(bps) = bps else {
        notes.push("no bandwidth cap".into());
        return Guard {
            limit: Limit::None,
            how: notes.join(", "),
        };
    };
    let limit = match backing_disk(target) {
        None => {
            notes.push(format!(
                "{} is on no block device: userspace pacing at {bps} B/s",
                target.display()
            ));
            Limit::Userspace {
                bps,
                start: Instant::now(),
                bytes: 0,
            }
        }
        Some((maj, min)) => match cgroup_limit(maj, min, bps) {
            Ok((cg, v2, how)) => {
                notes.push(how);
                Limit::Cgroup { cg, v2 }
            }
            Err(e) => {
                notes.push(format!(
                    "no usable blkio/io cgroup ({e}): userspace pacing at {bps} B/s"
                ));
                Limit::Userspace {
                    bps,
                    start: Instant::now(),
                    bytes: 0,
                }
            }
        },
    };
    Guard {
        limit,
        how: notes.join(", "),
    }
}

fn own_cgroup_path(controller: Option<&str>) -> String {
    // /proc/self/cgroup: "4:blkio:/system.slice/x.service" (v1) or "0::/x" (v2).
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        let (Some(ctrls), Some(path)) = (ctrls, path) else {
            continue;
        };
        let hit = match controller {
            Some(c) => ctrls.split(',').any(|x| x == c),
            None => ctrls.is_empty(),
        };
        if hit {
            return path.trim_start_matches('/').to_string();
        }
    }
    String::new()
}

fn cgroup_limit(maj: u64, min: u64, bps: u64) -> Result<(Cgroup, bool, String), String> {
    let hier = hierarchies::auto();
    let v2 = hier.v2();
    let parent = own_cgroup_path(if v2 { None } else { Some("blkio") });
    let name = format!("nimbus-update-writer.{}", std::process::id());
    let rel = if parent.is_empty() {
        name
    } else {
        format!("{parent}/{name}")
    };
    let cg = Cgroup::new_with_specified_controllers(hier, &rel, Some(vec!["blkio".to_string()]))
        .map_err(|e| format!("creating cgroup {rel}: {e}"))?;
    let setup = || -> Result<(), String> {
        let blk: &BlkIoController = cg
            .controller_of()
            .ok_or_else(|| "the blkio/io controller is not mounted".to_string())?;
        blk.throttle_write_bps_for_device(maj, min, bps)
            .map_err(|e| format!("setting the write cap on {maj}:{min}: {e}"))?;
        if v2 {
            cg.add_task_by_tgid(CgroupPid::from(std::process::id() as u64))
        } else {
            cg.add_task(CgroupPid::from(gettid()))
        }
        .map_err(|e| format!("joining cgroup {rel}: {e}"))
    };
    match setup() {
        Ok(()) => Ok((
            cg,
            v2,
            format!(
                "cgroup {} {rel}: write cap {bps} B/s on device {maj}:{min}",
                if v2 {
                    "v2 io.max"
                } else {
                    "v1 blkio.throttle.write_bps_device"
                }
            ),
        )),
        Err(e) => {
            let _ = cg.delete();
            Err(e)
        }
    }
}

/// Bytes per write call under a cap: a capped stream dispatched in 1 MiB
/// writes (or in the throttle's bursts of them) makes a workload's synced
/// writes queue behind whole megabytes; smaller pieces interleave.
pub const CAPPED_WRITE: usize = 256 * 1024;

impl Guard {
    /// How much to hand the kernel per write call.
    pub fn write_size(&self, buffer: usize) -> usize {
        match self.limit {
            Limit::None => buffer,
            _ => buffer.min(CAPPED_WRITE),
        }
    }

    /// After each write: userspace pacing sleeps until the average rate is
    /// back under the cap.
    pub fn account(&mut self, n: u64) {
        if let Limit::Userspace { bps, start, bytes } = &mut self.limit {
            *bytes += n;
            let due = Duration::from_secs_f64(*bytes as f64 / *bps as f64);
            let spent = start.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Limit::Cgroup { cg, v2 } = &self.limit {
            let moved = if *v2 {
                cg.move_task_to_parent_by_tgid(CgroupPid::from(std::process::id() as u64))
            } else {
                cg.move_task_to_parent(CgroupPid::from(gettid()))
            };
            if let Err(e) = moved.and_then(|_| cg.delete()) {
                tracing::warn!("leaving the writer cgroup: {e}");
            }
        }
    }
}

/// Remove writer cgroups left behind by a process that was killed (an empty
/// cgroup of a dead pid). Best effort: they cost nothing but clutter.
pub fn sweep_stale() {
    let root = Path::new("/sys/fs/cgroup/blkio");
    let parent = root.join(own_cgroup_path(Some("blkio")));
    let Ok(rd) = std::fs::read_dir(&parent) else {
        return;
    };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("nimbus-update-writer.") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir(ent.path());
            }
        }
    }
}
