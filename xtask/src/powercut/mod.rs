//! `cargo xtask powercut`: cut the power at every point of an update and
//! prove the disk still boots.
//!
//! The real update-engine (in process, `apply-file` path) installs 1.1.0
//! into USR-B of a Nimbus disk held in memory; then stage 1's tries
//! decrement and boot health's mark-good run on it. Every write and every
//! sync is recorded. A power cut after op k leaves what was synced before k
//! plus some of the unsynced writes: none of them, all of them, all with
//! the last one torn (only its first sectors landed), or random subsets.
//! For each such image the harness runs the boot rule as stage 1 does
//! (select, verify the signed descriptor, verify the data against its
//! verity root, else try the next slot) and requires a bootable, verified
//! slot; and the GPT must read back as the table of the last completed
//! sync or of the one in flight, never anything else.

pub mod fs;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use nimbus::gpt::{BlockDevice, Disk, GptError, MemDisk};
use nimbus::keys::{ReleaseKey, TrustStore};
use nimbus::layout::{Slot, MIB};
use nimbus::release::SlotDescriptor;
use nimbus::slots;
use nimbus_testkit::host;
use nimbus_updater::engine::{Engine, Host, Options, Shared, Storage};
use nimbus_updater::error::UpdateError;
use nimbus_updater::target::{SlotDevice, SlotIo};

/// A recorded step; `h` is the open handle it went through. A sync makes
/// durable only what its own handle wrote (the stricter model: on a real
/// block device one flush covers every handle, so a result that holds here
/// holds there).
#[derive(Clone)]
enum Op {
    Write { h: u32, off: u64, data: Vec<u8> },
    Sync { h: u32 },
}

struct Recorder {
    live: Mutex<MemDisk>,
    ops: Mutex<Vec<Op>>,
    handles: std::sync::atomic::AtomicU32,
}

fn put(d: &mut MemDisk, off: u64, data: &[u8]) -> std::io::Result<()> {
    d.seek(SeekFrom::Start(off))?;
    d.write_all(data)
}

fn get(d: &mut MemDisk, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    d.seek(SeekFrom::Start(off))?;
    d.read_exact(buf)
}

impl Recorder {
    fn new(img: MemDisk) -> Recorder {
        Recorder {
            live: Mutex::new(img),
            ops: Mutex::new(Vec::new()),
            handles: std::sync::atomic::AtomicU32::new(0),
        }
    }
    fn handle(&self) -> u32 {
        self.handles
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }
    fn write(&self, h: u32, off: u64, data: &[u8]) -> std::io::Result<()> {
        let mut live = self
            .live
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        put(&mut live, off, data)?;
        self.ops
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .push(Op::Write {
                h,
                off,
                data: data.to_vec(),
            });
        Ok(())
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut live = self
            .live
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        get(&mut live, off, buf)
    }
    fn sync(&self, h: u32) -> std::io::Result<()> {
        self.ops
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .push(Op::Sync { h });
        Ok(())
    }
}

/// The GPT's view: a seekable device over the recorder.
struct RecDev {
    rec: Arc<Recorder>,
    h: u32,
    pos: u64,
    len: u64,
}

impl Read for RecDev {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.len.saturating_sub(self.pos) as usize);
        self.rec.read(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for RecDev {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.rec.write(self.h, self.pos, buf)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for RecDev {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.pos = match pos {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.len.checked_add_signed(d).context_io()?,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).context_io()?,
        };
        Ok(self.pos)
    }
}

trait ContextIo<T> {
    fn context_io(self) -> std::io::Result<T>;
}
impl<T> ContextIo<T> for Option<T> {
    fn context_io(self) -> std::io::Result<T> {
        self.ok_or_else(|| std::io::Error::other("seek out of range"))
    }
}

impl BlockDevice for RecDev {
    fn sync(&mut self) -> std::io::Result<()> {
        self.rec.sync(self.h)
    }
}

struct RecSlot(Arc<Recorder>, u32);

impl SlotIo for RecSlot {
    fn write_all_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.write(self.1, off, buf)
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.0.read(off, buf)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync(self.1)
    }
}

struct RecStorage {
    rec: Arc<Recorder>,
    len: u64,
}

impl Storage for RecStorage {
    fn gpt(&self, _writable: bool) -> Result<Disk<Box<dyn BlockDevice>>, GptError> {
        let dev = RecDev {
            rec: self.rec.clone(),
            h: self.rec.handle(),
            pos: 0,
            len: self.len,
        };
        Disk::open(Box::new(dev) as Box<dyn BlockDevice>, "powercut-disk")
    }
    fn slot(&self, partition: u32, offset: u64, size: u64) -> Result<SlotDevice, UpdateError> {
        Ok(SlotDevice::with_io(
            Box::new(RecSlot(self.rec.clone(), self.rec.handle())),
            Path::new("powercut-disk"),
            partition,
            offset,
            size,
        ))
    }
}

/// A tree of `mib` MiB of compressible bytes and an os-release.
fn tree(dir: &Path, version: &str, mib: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("lib"))?;
    std::fs::write(
        dir.join("lib/os-release"),
        format!("ID=nimbus\nVERSION_ID={version}\n"),
    )?;
    let mut x: u64 = version
        .bytes()
        .fold(7, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut data = Vec::with_capacity(mib << 20);
    while data.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            data.extend_from_slice(&x.to_le_bytes()[..5]);
        } else {
            data.extend_from_slice(b"nimbus slot data ");
        }
    }
    data.truncate(mib << 20);
    std::fs::write(dir.join("lib/data.bin"), data)?;
    Ok(())
}

struct Setup {
    base: MemDisk,
    trust: TrustStore,
    root: PathBuf,
    payload: PathBuf,
    manifest: PathBuf,
}

fn setup(work: &Path) -> anyhow::Result<Setup> {
    let key = ReleaseKey::generate()?;
    let usr_size = 24 * MIB;
    let mut slots = Vec::new();
    // 0.9.0 sits in USR-B from an earlier update, 1.0.0 in USR-A (booted),
    // 1.1.0 is the payload: the engine must invalidate B before writing it.
    for v in ["1.0.0", "1.1.0", "0.9.0"] {
        let d = work.join(v);
        tree(&d.join("tree"), v, 6)?;
        let slot = nimbus_image::usr::build(&nimbus_image::usr::UsrInputs {
            usr_dir: &d.join("tree"),
            out_fs: &d.join("usr.erofs"),
            version: &v.parse()?,
            compression: nimbus_image::usr::Compression::None,
            epoch: 1_700_000_000,
            fs_uuid: uuid::Uuid::from_u128(v.len() as u128 + 9),
            slot_size: usr_size,
            keys: &[&key],
        })?;
        let info = slot.write_payload(&d.join("usr.img.zst"), 3)?;
        std::fs::write(
            d.join("build.json"),
            serde_json::to_vec(
                &serde_json::json!({"version": v, "verity_root": hex::encode(slot.fields.verity_root), "payload": info}),
            )?,
        )?;
        std::fs::write(
            d.join("trust.json"),
            nimbus::trust::TrustDoc::initial([key.public()], 1).to_bytes(),
        )?;
        slots.push(slot);
    }
    // The base disk: a sparse file with USR-A at 1.0.0 (1/0/1), loaded into memory.
    let file = work.join("disk.raw");
    host::disk(
        &file,
        usr_size,
        5,
        host::SlotInit::good(2, Some(&slots[0])),
        host::SlotInit::good(1, Some(&slots[2])),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let f = std::fs::File::open(&file)?;
    let len = f.metadata()?.len();
    let mut base = MemDisk::new(len);
    let mut buf = vec![0u8; 4096];
    let mut off = 0;
    use std::os::unix::fs::FileExt;
    while off < len {
        FileExt::read_exact_at(&f, &mut buf, off)?;
        if buf.iter().any(|&b| b != 0) {
            put(&mut base, off, &buf)?;
        }
        off += 4096;
    }
    std::fs::remove_file(&file)?;
    let repo = work.join("repo");
    nimbus_image::release::publish(&nimbus_image::release::PublishOptions::simple(
        &work.join("1.1.0"),
        &repo,
        "stable",
        &[&key],
    ))?;
    let root = host::root(
        &work.join("root"),
        &nimbus::trust::TrustDoc::initial([key.public()], 1).to_bytes(),
        "GROUP=stable\nSERVER=disabled\nIO_WRITE_BPS=unlimited\n",
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Setup {
        base,
        trust: TrustStore::new([key.public()], 1),
        root,
        payload: repo.join("payloads/1.1.0/usr.img.zst"),
        manifest: repo.join(nimbus::repo::manifest_rel("stable")),
    })
}

/// What the disk boots after a cut: the version stage 1 would run, or why
/// nothing boots, through stage 1's own loop (`nimbus::boot::boot_loop`,
/// on a copy: its tries decrement is not kept). The flag says a first
/// choice failed verification.
fn boots(img: &MemDisk, trust: &TrustStore) -> Result<(String, bool), String> {
    let mut disk = Disk::open(img.clone(), "cut").map_err(|e| format!("GPT unreadable: {e}"))?;
    disk.check_nimbus_layout().map_err(|e| e.to_string())?;
    let (choice, v, refused) = nimbus::boot::boot_loop(
        &mut disk,
        |d, c| verify_slot(img, d, c.number, trust).map_err(|e| e.to_string()),
        |_, _| {},
    )
    .map_err(|e| e.to_string())?;
    let label = Slot::from_partition_number(choice.number).map_or("?", |s| s.label());
    Ok((format!("{label}:{v}"), !refused.is_empty()))
}

/// Descriptor signature, then the verity tree over the data, as dm-verity
/// would see it: the root must match and the on-disk tree must be intact.
fn verify_slot(
    img: &MemDisk,
    disk: &Disk<MemDisk>,
    n: u32,
    trust: &TrustStore,
) -> anyhow::Result<String> {
    let p = disk.partition(n)?;
    let mut d = img.clone();
    let mut desc = vec![0u8; 4096];
    get(&mut d, p.offset_bytes() + p.size_bytes() - 4096, &mut desc)?;
    let fields = SlotDescriptor::verify(&desc, trust)?;
    let mut data = vec![0u8; fields.data_size as usize];
    get(&mut d, p.offset_bytes(), &mut data)?;
    let t = nimbus_image::verity::build(&data[..], fields.data_size, &fields.verity_salt)?;
    if t.root != fields.verity_root {
        bail!("data does not match the verity root");
    }
    let mut tree = vec![0u8; fields.hash_size as usize];
    get(&mut d, p.offset_bytes() + fields.hash_offset, &mut tree)?;
    if tree != t.bytes {
        bail!("hash tree damaged");
    }
    Ok(fields.version.to_string())
}

fn table(img: &MemDisk) -> Option<Vec<u64>> {
    Disk::open(img.clone(), "cut")
        .ok()
        .map(|d| d.slot_table().iter().map(|e| e.attributes).collect())
}

/// What the cuts over one sequence of writes gave.
struct Stats {
    n: usize,
    variants: usize,
    unbootable: usize,
    mixed: usize,
    old: usize,
    new: usize,
    refused: usize,
    failures: Vec<String>,
}

/// A write in the GPT's head or tail sectors of a disk of `len` bytes.
fn is_gpt(off: u64, data_len: usize, len: u64) -> bool {
    off < nimbus::layout::GPT_HEAD_SECTORS * 512
        || off + data_len as u64 > len - nimbus::layout::GPT_TAIL_SECTORS * 512
}

/// The update's writes with its last GPT commit (the flip to the new slot)
/// moved before the first slot-data write: a broken engine, for the
/// negative control.
fn flip_before_write(ops: &[Op], len: u64) -> Vec<Op> {
    let first_data = ops
        .iter()
        .position(|o| matches!(o, Op::Write { off, data, .. } if !is_gpt(*off, data.len(), len)));
    let last_data = ops
        .iter()
        .rposition(|o| matches!(o, Op::Write { off, data, .. } if !is_gpt(*off, data.len(), len)));
    let (Some(first), Some(last)) = (first_data, last_data) else {
        return ops.to_vec();
    };
    let flip: Vec<Op> = ops[last + 1..]
        .iter()
        .filter(|o| matches!(o, Op::Write { off, data, .. } if is_gpt(*off, data.len(), len)))
        .cloned()
        .flat_map(|w| {
            let h = match &w {
                Op::Write { h, .. } | Op::Sync { h } => *h,
            };
            [w, Op::Sync { h }]
        })
        .collect();
    let data_h = match &ops[last] {
        Op::Write { h, .. } | Op::Sync { h } => *h,
    };
    let mut out = ops[..first].to_vec();
    out.extend(flip);
    out.extend(ops[first..=last].iter().cloned());
    out.push(Op::Sync { h: data_h });
    out
}

/// The update's writes with the slot writer's syncs dropped (an engine
/// that flips the GPT without making the slot data durable first), for
/// the second negative control: only a per-handle sync model catches it.
fn without_slot_syncs(ops: &[Op], len: u64) -> Vec<Op> {
    let data_handles: std::collections::BTreeSet<u32> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Write { h, off, data } if !is_gpt(*off, data.len(), len) => Some(*h),
            _ => None,
        })
        .collect();
    ops.iter()
        .filter(|o| !matches!(o, Op::Sync { h } if data_handles.contains(h)))
        .cloned()
        .collect()
}

/// Unsynced writes: (handle, offset, bytes).
type Pending = Vec<(u32, u64, Vec<u8>)>;

/// Apply `op` to the durable `image` and the `pending` writes: a write is
/// pending until a sync of its own handle.
fn step(op: &Op, image: &mut MemDisk, pending: &mut Pending) -> std::io::Result<()> {
    match op {
        Op::Write { h, off, data } => pending.push((*h, *off, data.clone())),
        Op::Sync { h } => {
            let (now, later): (Pending, Pending) = pending.drain(..).partition(|(w, ..)| w == h);
            *pending = later;
            for (_, off, data) in now {
                put(image, off, &data)?;
            }
        }
    }
    Ok(())
}

/// Cut the power before every op of `ops` (starting from `base`) in
/// several ways: nothing unsynced landed, all of it, random subsets, and,
/// for a GPT-sized unsynced write, torn at every 512-byte boundary; check
/// each result boots a verified slot and holds a table that is the old or
/// the new one.
fn check_ops(
    ops: &[Op],
    base: &MemDisk,
    trust: &TrustStore,
    points: usize,
) -> anyhow::Result<Stats> {
    // Tables at each sync boundary: the durable states a cut must land on.
    let mut synced = base.clone();
    let mut synced_pending = Pending::new();
    let mut boundary_tables = vec![table(&synced)];
    let mut cuts = Vec::new(); // (k, boundary index)
    for (k, op) in ops.iter().enumerate() {
        cuts.push((k, boundary_tables.len() - 1));
        step(op, &mut synced, &mut synced_pending)?;
        if matches!(op, Op::Sync { .. }) {
            boundary_tables.push(table(&synced));
        }
    }
    let variants_per_cut = points.div_ceil(cuts.len().max(1)).max(4);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut st = Stats {
        n: 0,
        variants: variants_per_cut,
        unbootable: 0,
        mixed: 0,
        old: 0,
        new: 0,
        refused: 0,
        failures: Vec::new(),
    };
    let mut image = base.clone();
    let mut pending = Pending::new();
    let mut batch = Vec::with_capacity(BATCH);
    for (k, op) in ops.iter().enumerate() {
        // The cut lands before op k: `image` is durable, `pending` is not.
        let (_, bidx) = cuts[k];
        // Torn variants: the newest unsynced write, when GPT-sized, stopped
        // at each sector boundary (the others all landed).
        let torn: Vec<usize> = match pending.last() {
            Some((_, _, d)) if d.len() <= 64 * 1024 => {
                (1..d.len() / 512).map(|s| s * 512).collect()
            }
            _ => Vec::new(),
        };
        for variant in 0..variants_per_cut + torn.len() {
            let mut img = image.clone();
            if variant >= variants_per_cut {
                let keep = torn[variant - variants_per_cut];
                for (i, (_, off, data)) in pending.iter().enumerate() {
                    let n = if i + 1 == pending.len() {
                        keep
                    } else {
                        data.len()
                    };
                    put(&mut img, *off, &data[..n])?;
                }
            } else {
                let landed: Vec<&(u32, u64, Vec<u8>)> = match variant {
                    0 => Vec::new(),
                    1 => pending.iter().collect(),
                    _ => pending.iter().filter(|_| next() % 2 == 0).collect(),
                };
                for (_, off, data) in &landed {
                    put(&mut img, *off, data)?;
                }
                if variant == 2 {
                    // Torn: the last unsynced write only got its first sectors down.
                    if let Some((_, off, data)) = pending.last() {
                        let keep = (data.len() / 512 / 2) * 512;
                        put(&mut img, *off, &data[..keep])?;
                    }
                }
            }
            batch.push(Cut {
                k,
                variant,
                bidx,
                img,
            });
            if batch.len() >= BATCH {
                judge(&mut batch, &mut st, trust, &boundary_tables);
            }
        }
        step(op, &mut image, &mut pending)?;
    }
    judge(&mut batch, &mut st, trust, &boundary_tables);
    Ok(st)
}

/// A disk as a cut left it, before op `k`, with the sync boundary it falls
/// after (`bidx`).
struct Cut {
    k: usize,
    variant: usize,
    bidx: usize,
    img: MemDisk,
}

/// Cuts judged at once, one thread each: making the disks is sequential
/// (one random stream), judging them (stage 1's rule, a verity tree over
/// the slot) is most of the time and independent.
const BATCH: usize = 8;

/// Judge `batch` on every core and count the results into `st` in the
/// batch's order (so the failures read as the cuts were made).
fn judge(batch: &mut Vec<Cut>, st: &mut Stats, trust: &TrustStore, tables: &[Option<Vec<u64>>]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cuts = std::mem::take(batch);
    let chunk = cuts.len().div_ceil(threads).max(1);
    let verdicts: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = cuts
            .chunks(chunk)
            .map(|part| {
                let len = part.len();
                let w = s.spawn(move || {
                    part.iter()
                        .map(|c| (boots(&c.img, trust), table(&c.img)))
                        .collect::<Vec<_>>()
                });
                (w, len)
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|(w, len)| {
                // A worker that panicked is a harness bug: count its cuts
                // as failures rather than lose them (the last part may be
                // shorter than `chunk`).
                w.join().unwrap_or_else(|_| {
                    vec![(Err("the judging thread panicked".to_string()), None); len]
                })
            })
            .collect()
    });
    for (c, (booted, t)) in cuts.iter().zip(verdicts) {
        let (k, variant, bidx) = (c.k, c.variant, c.bidx);
        st.n += 1;
        if let Ok((_, true)) = &booted {
            // Stage 1 would have burnt a try on a slot that does not verify.
            st.refused += 1;
        }
        match booted.map(|(b, _)| b) {
            Ok(b) if b.starts_with("USR-A:1.0.0") => st.old += 1,
            Ok(b) if b.starts_with("USR-B:1.1.0") => st.new += 1,
            Ok(b) => {
                st.unbootable += 1;
                st.failures
                    .push(format!("cut before op {k} variant {variant}: boots {b}"));
            }
            Err(e) => {
                st.unbootable += 1;
                st.failures
                    .push(format!("cut before op {k} variant {variant}: {e}"));
            }
        }
        let ok = t == tables[bidx] || tables.get(bidx + 1).is_some_and(|b| *b == t);
        if !ok {
            st.mixed += 1;
            st.failures.push(format!(
                "cut before op {k} variant {variant}: GPT table {t:?} is neither {:?} nor {:?}",
                tables[bidx],
                tables.get(bidx + 1)
            ));
        }
    }
}

pub fn run(points: usize) -> anyhow::Result<ExitCode> {
    let work = tempfile::Builder::new()
        .prefix("powercut")
        .tempdir()
        .context("temp dir")?;
    let s = setup(work.path())?;
    let len = s.base.len();
    let rec = Arc::new(Recorder::new(s.base.clone()));
    let storage = Arc::new(RecStorage {
        rec: rec.clone(),
        len,
    });

    // The real engine, on the recorder: invalidate, stream, verify, flip.
    let host = Host {
        root: s.root.clone(),
        disk: PathBuf::from("powercut-disk"),
        booted: 3,
        host_mode: true,
        storage: storage.clone(),
        esp: Arc::new(nimbus::esp::DirEsp(s.root.join("esp"))),
    };
    // The engine's file writes (state file, update.conf) are recorded too.
    let root_before = crate::powercut::fs::snapshot(&s.root)?;
    // The host's files before the update, for the re-runs after each cut.
    let root_template = work.path().join("root-template");
    nimbus_image::copy_tree(&s.root, &root_template, nimbus_image::Metadata::Keep)?;
    nimbus::durable::trace_start();
    let mut engine = Engine::new(host, &Options::default(), Arc::new(Shared::new()))?;
    let sigs = nimbus::repo::sig_path(&s.manifest);
    let applied = engine.apply_file(&s.payload, &s.manifest, &sigs);
    let switched = nimbus_updater::engine::write_group(&s.root, "beta");
    let engine_trace = nimbus::durable::trace_take();
    let v = applied?;
    switched?;
    let update_ops = rec
        .ops
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .len();
    // The next boot: stage 1 spends USR-B's try, then health marks it good.
    let mut d = storage.gpt(true)?;
    d.update_slots(|t| {
        slots::select_for_boot(t, &[]);
        Ok(())
    })?;
    d.update_slots(|t| slots::mark_good(t, 4))?;
    drop(d);
    let ops = rec
        .ops
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    eprintln!(
        "powercut: installed {v}; {update_ops} ops for the update, {} with the boot and mark-good",
        ops.len()
    );

    let st = check_ops(&ops, &s.base, &s.trust, points)?;
    let Stats {
        n,
        variants: variants_per_cut,
        unbootable,
        mixed,
        old,
        new,
        refused,
        failures,
    } = st;
    println!("| cut points | boots 1.0.0 (old) | boots 1.1.0 (new) | first choice failed verification | unbootable | GPT neither old nor new |");
    println!("|---|---|---|---|---|---|");
    println!("| {n} ({} ops x {variants_per_cut} variants) | {old} | {new} | {refused} | {unbootable} | {mixed} |", ops.len());
    for f in failures.iter().take(20) {
        println!("  {f}");
    }
    // Negative control: the same writes with the GPT flip moved before
    // the slot data (what a broken engine would do). The harness must see
    // cut points where stage 1 meets an unverifiable first choice or
    // nothing bootable; if it saw none, it could not tell a broken order.
    // After a cut, the next run of the engine on that disk (from the host's
    // files as they were before the update) must finish the update or
    // refuse cleanly; either way the disk must boot a verified slot.
    let sigs_path = nimbus::repo::sig_path(&s.manifest);
    let (mut rerun_done, mut rerun_refused, mut rerun_bad) = (0usize, 0usize, Vec::new());
    let mut image = s.base.clone();
    let mut pending = Pending::new();
    for (k, op) in ops[..update_ops].iter().enumerate() {
        for landed in [false, true] {
            let mut img = image.clone();
            if landed {
                for (_, off, data) in &pending {
                    put(&mut img, *off, data)?;
                }
            }
            let root = work.path().join(format!("rerun-{k}-{landed}"));
            nimbus_image::copy_tree(&root_template, &root, nimbus_image::Metadata::Keep)?;
            let rec = Arc::new(Recorder::new(img));
            let host = Host {
                root: root.clone(),
                disk: PathBuf::from("powercut-disk"),
                booted: 3,
                host_mode: true,
                storage: Arc::new(RecStorage {
                    rec: rec.clone(),
                    len,
                }),
                esp: Arc::new(nimbus::esp::DirEsp(root.join("esp"))),
            };
            let r = Engine::new(host, &Options::default(), Arc::new(Shared::new()))
                .and_then(|mut e| e.apply_file(&s.payload, &s.manifest, &sigs_path));
            let after = rec
                .live
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clone();
            match (r, boots(&after, &s.trust)) {
                (Ok(_), Ok((b, false))) if b.starts_with("USR-B:1.1.0") => rerun_done += 1,
                (Err(_), Ok((b, false))) if b.starts_with("USR-A:1.0.0") => rerun_refused += 1,
                (r, b) => rerun_bad.push(format!(
                    "re-run after a cut before op {k} (unsynced {}): engine {:?}, boots {b:?}",
                    if landed { "landed" } else { "lost" },
                    r.map(|v| v.to_string()).map_err(|e| e.to_string())
                )),
            }
            let _ = std::fs::remove_dir_all(&root);
        }
        step(op, &mut image, &mut pending)?;
    }
    println!(
        "engine re-run after a cut: {} cuts, {rerun_done} finished the update, {rerun_refused} refused cleanly, {} otherwise",
        2 * update_ops,
        rerun_bad.len()
    );
    for f in rerun_bad.iter().take(10) {
        println!("  {f}");
    }
    if !rerun_bad.is_empty() {
        bail!(
            "{} engine re-runs after a cut neither finished nor refused cleanly",
            rerun_bad.len()
        );
    }
    // Negative controls: broken engines' writes through the same checks.
    for (what, broken) in [
        (
            "GPT flip before the slot data",
            flip_before_write(&ops[..update_ops], len),
        ),
        (
            "slot data never synced before the flip",
            without_slot_syncs(&ops[..update_ops], len),
        ),
    ] {
        let c = check_ops(&broken, &s.base, &s.trust, 0)?;
        println!(
            "negative control ({what}): {} cut points, {} first choices failed verification, {} unbootable",
            c.n, c.refused, c.unbootable
        );
        if c.refused + c.unbootable == 0 {
            bail!("the harness cannot tell this broken engine from a correct one: {what}");
        }
    }

    // File writes: the engine's, then cloud-config's.
    let cloud = work.path().join("cloud-root");
    crate::powercut::fs::cloud_root(&cloud)?;
    let cloud_before = crate::powercut::fs::snapshot(&cloud)?;
    let (data, problems) = nimbus_cloud_config::schema::check(crate::powercut::fs::USER_DATA);
    let Some(nimbus_cloud_config::schema::UserData::CloudConfig(cfg)) = data else {
        bail!("the power-cut user-data does not validate: {problems:?}");
    };
    nimbus::durable::trace_start();
    let applied = nimbus_cloud_config::apply::Root::new(&cloud).and_then(|mut r| {
        nimbus_cloud_config::apply::apply(&mut r, &cfg, &mut nimbus_cloud_config::apply::NoCommands)
            .map(|_| r.report)
    });
    let cloud_trace = nimbus::durable::trace_take();
    let report = applied?;
    if !report.errors.is_empty() {
        bail!("cloud-config apply reported: {:?}", report.errors);
    }
    println!();
    println!("| file writes | steps | files replaced | cut points | neither old nor new | same, without fsync before rename |");
    println!("|---|---|---|---|---|---|");
    let mut file_points = 0;
    let mut file_mixed = 0;
    for (name, trace, before) in [
        (
            "update-engine (state file, update.conf)",
            &engine_trace,
            &root_before,
        ),
        ("cloud-config apply", &cloud_trace, &cloud_before),
    ] {
        let r = crate::powercut::fs::check(trace, before, 6, 0x5eed);
        let m = crate::powercut::fs::check(
            &crate::powercut::fs::without_file_syncs(trace),
            before,
            6,
            0x5eed,
        );
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            trace.len(),
            r.files,
            r.points,
            r.mixed,
            m.mixed
        );
        for f in &r.failures {
            println!("  {name}: {f}");
        }
        if r.files == 0 || m.mixed == 0 {
            bail!("{name}: the file trace is empty or the harness cannot tell a broken write path ({} files, {} mixed without fsync)", r.files, m.mixed);
        }
        file_points += r.points;
        file_mixed += r.mixed;
    }

    // The ESP: a stage-1 update into copy b, then mark-good's bless.
    let esp_root = work.path().join("esp");
    let esp = nimbus::esp::DirEsp(esp_root.clone());
    let (k1, i1) = (vec![0x11u8; 40_000], vec![0x12u8; 90_000]);
    let (k2, i2) = (vec![0x21u8; 41_000], vec![0x22u8; 95_000]);
    {
        use nimbus::esp::EspFs;
        for (p, b) in nimbus::esp::initial_files("1.0.0", nimbus::boot::KERNEL_CMDLINE)? {
            esp.replace(&p, &b)?;
        }
        esp.replace(&nimbus::esp::Copy::A.kernel(), &k1)?;
        esp.replace(&nimbus::esp::Copy::A.initramfs(), &i1)?;
    }
    let esp_before = crate::powercut::fs::snapshot(&esp_root)?;
    nimbus::durable::trace_start();
    let installed = nimbus::esp::install_stage1(
        &esp,
        nimbus::esp::Copy::A,
        &k2,
        &i2,
        "1.1.0",
        nimbus::boot::KERNEL_CMDLINE,
    )
    .and_then(|_| nimbus::esp::bless(&esp, nimbus::esp::Copy::B));
    let esp_trace = nimbus::durable::trace_take();
    installed?;
    let whole = [(k1, i1), (k2, i2)];
    let r = crate::powercut::fs::esp_check(&esp_trace, &esp_before, &esp_root, &whole, 6, 0x5eed);
    let m = crate::powercut::fs::esp_check(
        &crate::powercut::fs::without_file_syncs(&esp_trace),
        &esp_before,
        &esp_root,
        &whole,
        6,
        0x5eed,
    );
    println!();
    println!("| ESP stage-1 update | steps | cut points | a loader starts a copy that is not whole | same, without fsyncs |");
    println!("|---|---|---|---|---|");
    println!(
        "| install into copy b, then bless | {} | {} | {} | {} |",
        esp_trace.len(),
        r.points,
        r.unbootable,
        m.unbootable
    );
    for x in &r.failures {
        println!("  ESP: {x}");
    }
    if m.unbootable == 0 {
        bail!(
            "ESP: the harness cannot tell a broken stage-1 write path (0 unbootable without fsync)"
        );
    }
    let n = n + file_points + r.points;
    let mixed = mixed + file_mixed;
    let unbootable = unbootable + r.unbootable;
    println!("powercut: points={n} unbootable={unbootable} mixed_state={mixed}");
    Ok(
        if unbootable == 0 && mixed == 0 && refused == 0 && n >= points {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}
