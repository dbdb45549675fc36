//! `cargo xtask disk`: the slot protocol on image files, for developers and tests.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use nimbus::gpt::{Disk, PartitionInfo};
use nimbus::keys::TrustStore;
use nimbus::layout::{self, Slot, DEFAULT_USR_SIZE};
use nimbus::release::SlotDescriptor;
use nimbus::slots::{self, Prio};
use serde::Serialize;
use uuid::Uuid;

use crate::parse_size;

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Create an image file with an empty Nimbus layout (USR-A 1/0/1, USR-B 0/0/0).
    New {
        file: PathBuf,
        /// Disk size, e.g. 3G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Size of each USR slot.
        #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_USR_SIZE)]
        usr_size: u64,
        /// Derive the disk and partition GUIDs from this string (reproducible images).
        #[arg(long)]
        seed: Option<String>,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Print every partition and the USR slots' attributes and descriptors.
    Show {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// Check descriptor signatures against a trust set file
        /// (trust.json) or the *.pub keys in a directory (threshold 1).
        #[arg(long, value_name = "PATH")]
        keys: Option<PathBuf>,
    },
    /// Make a slot the next boot: top priority, tries 1, successful 0.
    Prioritize {
        file: PathBuf,
        #[arg(long)]
        slot: Slot,
    },
    /// Mark a slot good: successful 1, tries 0, top priority.
    MarkGood {
        file: PathBuf,
        #[arg(long)]
        slot: Slot,
    },
    /// Make a slot unbootable (priority 0, tries 0, successful 0).
    Invalidate {
        file: PathBuf,
        #[arg(long)]
        slot: Slot,
    },
    /// Apply the boot rule once, persist the tries decrement and print the chosen slot.
    /// Exits 1 if no slot is bootable.
    Select { file: PathBuf },
    /// Rewrite both GPT copies from the valid one.
    Repair { file: PathBuf },
}

pub fn run(cmd: DiskCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DiskCmd::New {
            file,
            size,
            usr_size,
            seed,
            force,
        } => new(&file, size, usr_size, seed.as_deref(), force),
        DiskCmd::Show { file, json, keys } => show(&file, json, keys.as_deref()),
        DiskCmd::Prioritize { file, slot } => {
            modify(&file, |t| slots::prioritize(t, slot.partition_number()))?;
            Ok(ExitCode::SUCCESS)
        }
        DiskCmd::MarkGood { file, slot } => {
            modify(&file, |t| slots::mark_good(t, slot.partition_number()))?;
            Ok(ExitCode::SUCCESS)
        }
        DiskCmd::Invalidate { file, slot } => {
            modify(&file, |t| slots::invalidate(t, slot.partition_number()))?;
            Ok(ExitCode::SUCCESS)
        }
        DiskCmd::Select { file } => {
            let choice = modify(&file, |t| Ok(slots::select_for_boot(t, &[])))?;
            match choice.and_then(|c| Slot::from_partition_number(c.number)) {
                Some(slot) => {
                    println!("{slot}");
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("error: {}: no bootable USR slot", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        DiskCmd::Repair { file } => {
            let mut d = Disk::open_path(&file, true)?;
            let h = d.health().clone();
            d.repair()?;
            if h.is_clean() {
                eprintln!("{}: both GPT copies were valid; rewritten", file.display());
            } else {
                eprintln!("{}: repaired ({})", file.display(), describe_health(&h));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn modify<T>(
    file: &Path,
    op: impl FnOnce(&mut Vec<slots::Entry>) -> Result<T, slots::SlotError>,
) -> anyhow::Result<T> {
    let mut d = Disk::open_path(file, true)?;
    if !d.health().is_clean() {
        eprintln!(
            "warning: {}: {}; both copies will be rewritten",
            file.display(),
            describe_health(d.health())
        );
    }
    Ok(d.update_slots(op)?)
}

fn describe_health(h: &nimbus::gpt::Health) -> String {
    let mut parts = Vec::new();
    if let Some(e) = &h.primary_error {
        parts.push(format!("primary GPT damaged ({e}), using the backup"));
    }
    if let Some(e) = &h.backup_error {
        parts.push(format!("backup GPT damaged ({e})"));
    }
    if h.copies_differ {
        parts.push("primary and backup GPT differ, using the primary".into());
    }
    parts.join("; ")
}

fn seeded(seed: &str, what: &str) -> Uuid {
    // A fixed namespace so that the same seed always gives the same GUIDs.
    const NS: Uuid = uuid::uuid!("6e696d62-7573-4000-8000-6469736b0000");
    Uuid::new_v5(&NS, format!("{seed}/{what}").as_bytes())
}

fn new(
    file: &Path,
    size: u64,
    usr_size: u64,
    seed: Option<&str>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    // Check the plan before touching the file system.
    layout::plan(size, usr_size)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .create_new(!force)
        .open(file)
        .with_context(|| format!("{}: cannot create (use --force to replace)", file.display()))?;
    f.set_len(size)
        .with_context(|| format!("{}: set size", file.display()))?;
    let guid = |what: &str| match seed {
        Some(s) => seeded(s, what),
        None => Uuid::new_v4(),
    };
    let disk_guid = guid("disk");
    let usr_a = Prio {
        priority: 1,
        tries: 0,
        successful: true,
    };
    let created = Disk::create(
        f,
        file,
        usr_size,
        disk_guid,
        |s| guid(s.label),
        |s| {
            if s.number == Slot::A.partition_number() {
                usr_a.apply_to(0)
            } else {
                0
            }
        },
    );
    if let Err(e) = created {
        // Leave no half-made image under the requested name.
        let _ = std::fs::remove_file(file);
        return Err(e.into());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ShowPartition {
    number: u32,
    label: String,
    type_guid: Uuid,
    uuid: Uuid,
    first_lba: u64,
    last_lba: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tries: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    successful: Option<bool>,
    attributes: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    descriptor: Option<ShowDescriptor>,
}

#[derive(Serialize)]
struct ShowDescriptor {
    #[serde(flatten)]
    fields: Option<SlotDescriptor>,
    /// Why the descriptor could not be decoded, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// true/false when --keys was given, null otherwise.
    signature_valid: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature_error: Option<String>,
}

#[derive(Serialize)]
struct ShowDisk {
    path: PathBuf,
    disk_guid: Uuid,
    health: nimbus::gpt::Health,
    nimbus_layout: bool,
    partitions: Vec<ShowPartition>,
}

fn show(file: &Path, json: bool, keys: Option<&Path>) -> anyhow::Result<ExitCode> {
    let trust = match keys {
        Some(k) if k.is_file() => Some(nimbus::trust::load(k)?),
        Some(k) => Some(TrustStore::load_dir(k, 1)?),
        None => None,
    };
    let mut d = Disk::open_path(file, false)?;
    let nimbus_layout = d.check_nimbus_layout().is_ok();
    let parts: Vec<PartitionInfo> = d.partitions();
    let mut out = Vec::new();
    for p in parts {
        let slot = (p.type_guid == layout::USR_TYPE)
            .then(|| Slot::from_partition_number(p.number))
            .flatten();
        let prio = slot.map(|_| p.prio());
        let descriptor = match slot {
            Some(s) => describe_slot(&mut d, s, trust.as_ref())?,
            None => None,
        };
        out.push(ShowPartition {
            number: p.number,
            label: p.label.clone(),
            type_guid: p.type_guid,
            uuid: p.uuid,
            first_lba: p.first_lba,
            last_lba: p.last_lba,
            priority: prio.map(|x| x.priority),
            tries: prio.map(|x| x.tries),
            successful: prio.map(|x| x.successful),
            attributes: format!("{:#018x}", p.attributes),
            descriptor,
        });
    }
    let report = ShowDisk {
        path: file.to_path_buf(),
        disk_guid: d.disk_guid(),
        health: d.health().clone(),
        nimbus_layout,
        partitions: out,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_slot(
    d: &mut Disk<std::fs::File>,
    slot: Slot,
    trust: Option<&TrustStore>,
) -> anyhow::Result<Option<ShowDescriptor>> {
    let bytes = d.read_descriptor(slot)?;
    if bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let (fields, error) = match SlotDescriptor::parse_unverified(&bytes) {
        Ok(f) => (Some(f), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (signature_valid, signature_error) = match trust {
        None => (None, None),
        Some(t) => match SlotDescriptor::verify(&bytes, t) {
            Ok(_) => (Some(true), None),
            Err(e) => (Some(false), Some(e.to_string())),
        },
    };
    Ok(Some(ShowDescriptor {
        fields,
        error,
        signature_valid,
        signature_error,
    }))
}

fn print_table(r: &ShowDisk) {
    println!("disk {}  guid {}", r.path.display(), r.disk_guid);
    if !r.health.is_clean() {
        println!("WARNING: {}", describe_health(&r.health));
    }
    if !r.nimbus_layout {
        println!("WARNING: not a Nimbus layout");
    }
    println!(
        "{:>3} {:<11} {:>10} {:>10} {:>5} {:>5} {:>4}  uuid",
        "#", "label", "first", "last", "prio", "tries", "ok"
    );
    for p in &r.partitions {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{:>3} {:<11} {:>10} {:>10} {:>5} {:>5} {:>4}  {}",
            p.number,
            p.label,
            p.first_lba,
            p.last_lba,
            opt(p.priority.map(|x| x.to_string())),
            opt(p.tries.map(|x| x.to_string())),
            opt(p.successful.map(|x| u8::from(x).to_string())),
            p.uuid
        );
        if let Some(d) = &p.descriptor {
            match (&d.fields, &d.error) {
                (Some(f), _) => println!(
                    "      version {} data_size {} hash_offset {} verity_root {} salt {} signed by {}",
                    f.version,
                    f.data_size,
                    f.hash_offset,
                    hex::encode(f.verity_root),
                    hex::encode(f.verity_salt),
                    f.signers
                        .iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (None, Some(e)) => println!("      descriptor unreadable: {e}"),
                (None, None) => {}
            }
            match (d.signature_valid, &d.signature_error) {
                (Some(true), _) => println!("      signature: valid"),
                (Some(false), e) => {
                    println!("      signature: INVALID: {}", e.as_deref().unwrap_or(""))
                }
                (None, _) => {
                    println!("      signature: not checked (pass --keys trust.json or DIR)")
                }
            }
        }
    }
}
