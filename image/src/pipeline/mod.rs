//! `cargo xtask build-image`: the whole build, stage by stage.
//!
//! Every input is checked before anything large is written; every artifact
//! is written under a temporary name in the output directory and renamed
//! into place only when the whole build succeeded.

use std::fs::{self};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nimbus::keys::{ReleaseKey, TrustStore};
use nimbus::layout::{self};
use semver::Version;
use uuid::Uuid;

use crate::rootfs::{self, RootfsSpec};
use crate::usr::{self, Compression, PayloadInfo};
use crate::{bios, esp, sha256_file, ImageError};

mod customize;
mod disk;
mod vagrant;

use customize::{customize, stage1_initramfs};
pub use customize::{stage1_modules, STAGE1_MODULES};
use disk::{mkfs_ext4, oem_image, part, qcow2, write_disk, Parts};
pub use vagrant::VAGRANT_INSECURE_KEY;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Box,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "box" => Ok(Format::Box),
            _ => Err(format!("unknown format {s:?}: use raw, qcow2 or box")),
        }
    }
}

/// A file to install into the image.
#[derive(Debug, Clone)]
pub struct Install {
    /// Absolute path inside the image, e.g. /usr/bin/cloud-config.
    pub dest: String,
    pub source: PathBuf,
    pub mode: u32,
}

/// A systemd unit shipped in /usr/lib/systemd/system and enabled through
/// its [Install] section.
#[derive(Debug, Clone)]
pub struct UnitFile {
    pub name: String,
    pub content: String,
}

#[derive(Clone)]
pub struct BuildOptions {
    pub version: Version,
    pub channel: String,
    /// Release key directories; every key signs the USR descriptor.
    pub key_dirs: Vec<PathBuf>,
    /// The built-in trust set (USR and stage 1); without it, the signing
    /// keys with threshold 1, version 1.
    pub trust: Option<PathBuf>,
    pub dev_key: bool,
    pub usr_size: u64,
    pub disk_size: u64,
    pub user_data: Option<PathBuf>,
    /// Files for the OEM partition's root, by their names (platform agents
    /// and their data, as on Flatcar's OEM partition).
    pub oem_files: Vec<PathBuf>,
    pub formats: Vec<Format>,
    pub out: PathBuf,
    pub cache: PathBuf,
    pub epoch: u64,
    pub compression: Compression,
    pub zstd_level: i32,
    pub server: String,
    pub installs: Vec<Install>,
    pub units: Vec<UnitFile>,
    /// The stage-1 /init, once the boot selector exists (issue #4).
    pub stage1_init: Option<PathBuf>,
    pub rootfs: RootfsSpec,
    /// Keep `<out>/.work` (the USR tree, partition images) for benchmarks.
    pub keep_work: bool,
}

pub trait Progress {
    fn start(&mut self, stage: &str);
    fn finish(&mut self, stage: &str, seconds: f64, note: &str);
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
    pub note: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuildReport {
    pub version: String,
    pub channel: String,
    pub key_ids: Vec<String>,
    pub trust_version: u64,
    pub dev_key: bool,
    pub source_date_epoch: u64,
    pub kernel: String,
    pub disk_size: u64,
    pub usr_size: u64,
    pub usr_compression: Compression,
    pub usr_data_size: u64,
    pub usr_hash_size: u64,
    pub verity_root: String,
    pub usr_slot_sha256: String,
    pub payload: PayloadInfo,
    pub rootfs_cache: String,
    pub stage1_init: bool,
    pub artifacts: Vec<Artifact>,
    pub stages: Vec<StageTime>,
    pub total_seconds: f64,
}

fn io_at(p: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: p.to_path_buf(),
        source,
    }
}

fn seeded(version: &Version, what: &str) -> Uuid {
    const NS: Uuid = uuid::uuid!("6e696d62-7573-4000-8000-696d61676500");
    Uuid::new_v5(&NS, format!("{version}/{what}").as_bytes())
}

struct Stages<'p> {
    progress: &'p mut dyn Progress,
    times: Vec<StageTime>,
}

impl Stages<'_> {
    fn run<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, String), ImageError>,
    ) -> Result<T, ImageError> {
        self.progress.start(name);
        let t = Instant::now();
        let (v, note) = f()?;
        let secs = t.elapsed().as_secs_f64();
        self.progress.finish(name, secs, &note);
        self.times.push(StageTime {
            stage: name.into(),
            seconds: (secs * 1000.0).round() / 1000.0,
            note,
        });
        Ok(v)
    }
}

/// Checks that need no large writes: run them first.
pub fn preflight(o: &BuildOptions) -> Result<Signing, ImageError> {
    if !nimbus::release::valid_channel_name(&o.channel) {
        return Err(ImageError::Invalid(format!(
            "--channel {:?} is not a valid channel name ([a-z0-9._-])",
            o.channel
        )));
    }
    layout::plan(o.disk_size, o.usr_size)
        .map_err(|e| ImageError::Invalid(format!("--disk-size/--usr-size: {e}")))?;
    if o.formats.is_empty() {
        return Err(ImageError::Invalid("--formats is empty".into()));
    }
    let signing = signing(o)?;
    if let Some(ud) = &o.user_data {
        let text = fs::read_to_string(ud).map_err(io_at(ud))?;
        if !(text.starts_with("#cloud-config") || text.starts_with("#!")) {
            return Err(ImageError::Invalid(format!(
                "--user-data {}: neither #cloud-config nor a #! script",
                ud.display()
            )));
        }
    }
    for f in &o.oem_files {
        if !f.is_file() {
            return Err(ImageError::Invalid(format!(
                "--oem-file {}: not a file",
                f.display()
            )));
        }
    }
    for i in &o.installs {
        if !i.source.is_file() {
            return Err(ImageError::Invalid(format!(
                "{}: missing (to be installed as {})",
                i.source.display(),
                i.dest
            )));
        }
    }
    fs::create_dir_all(&o.out).map_err(|e| {
        ImageError::Invalid(format!("--out {}: cannot create: {e}", o.out.display()))
    })?;
    let probe = o.out.join(".write-probe");
    fs::write(&probe, b"").map_err(|e| {
        ImageError::Invalid(format!("--out {}: not writable: {e}", o.out.display()))
    })?;
    let _ = fs::remove_file(&probe);
    Ok(signing)
}

/// The keys that sign this build and the trust set it carries.
pub struct Signing {
    pub keys: Vec<ReleaseKey>,
    pub trust: TrustStore,
}

impl Signing {
    pub fn key_refs(&self) -> Vec<&ReleaseKey> {
        self.keys.iter().collect()
    }

    pub fn trust_json(&self) -> Vec<u8> {
        nimbus::trust::TrustDoc::from_store(&self.trust).to_bytes()
    }
}

fn signing(o: &BuildOptions) -> Result<Signing, ImageError> {
    if o.key_dirs.is_empty() {
        return Err(ImageError::Invalid("no --key given".into()));
    }
    let mut keys: Vec<ReleaseKey> = Vec::new();
    for d in &o.key_dirs {
        if !d.is_dir() {
            return Err(ImageError::Invalid(format!(
                "--key {}: no such directory (create one with `cargo xtask keygen --out DIR`)",
                d.display()
            )));
        }
        let k = ReleaseKey::load_dir(d).map_err(|e| ImageError::Invalid(format!("--key: {e}")))?;
        if keys.iter().any(|x| x.id == k.id) {
            return Err(ImageError::Invalid(format!(
                "--key {}: key {} is given twice",
                d.display(),
                k.id
            )));
        }
        keys.push(k);
    }
    let trust = match &o.trust {
        Some(p) => {
            nimbus::trust::load(p).map_err(|e| ImageError::Invalid(format!("--trust: {e}")))?
        }
        None => {
            let mut t = TrustStore::new(keys.iter().map(|k| k.public()), 1);
            t.version = 1;
            t
        }
    };
    // The build must boot under its own trust set: enough of the signing
    // keys must be in it. Checked now, not after a 5-minute build.
    let trusted = keys
        .iter()
        .filter(|k| trust.keys.contains_key(&k.id))
        .count();
    if trusted < trust.threshold {
        return Err(ImageError::Invalid(format!(
            "the trust set ({}) needs {} signatures but only {trusted} of the --key keys are in it",
            trust.summary(),
            trust.threshold
        )));
    }
    Ok(Signing { keys, trust })
}

/// The stage-1 kernel's command line on every firmware path: the kernel
/// logs to the VGA console and to ttyS0; ttyS0 comes last, so it is
/// /dev/console (what serial consoles and the tests read).
pub use nimbus::boot::KERNEL_CMDLINE;

/// Run the build. On failure the scratch directory and every temporary
/// artifact are removed; nothing is left under a final name.
pub fn build(o: &BuildOptions, progress: &mut dyn Progress) -> Result<BuildReport, ImageError> {
    let r = build_inner(o, progress);
    if r.is_err() {
        let _ = fs::remove_dir_all(o.out.join(".work"));
        for t in [
            ".nimbus.raw.tmp",
            ".nimbus.qcow2.tmp",
            ".nimbus.box.tmp",
            ".usr.img.zst.tmp",
        ] {
            let _ = fs::remove_file(o.out.join(t));
        }
    }
    r
}

fn build_inner(o: &BuildOptions, progress: &mut dyn Progress) -> Result<BuildReport, ImageError> {
    let t0 = Instant::now();
    let signing = preflight(o)?;
    let mut st = Stages {
        progress,
        times: Vec::new(),
    };
    let work = o.out.join(".work");
    fs::create_dir_all(&work).map_err(io_at(&work))?;
    fs::create_dir_all(&o.cache).map_err(io_at(&o.cache))?;

    let rootfs = st.run("rootfs", || {
        let r = rootfs::obtain(&o.rootfs, &o.cache, &work.join("mmdebstrap.log"))?;
        let note = if r.cache_hit {
            "cache hit".to_string()
        } else {
            format!(
                "built with mmdebstrap ({} bad cached debs dropped)",
                r.debs_dropped
            )
        };
        Ok((r, note))
    })?;
    let staging = work.join("root");
    let kver = st.run("customize", || {
        let _ = fs::remove_dir_all(&staging);
        crate::copy_tree(&rootfs.dir, &staging, crate::Metadata::Keep)?;
        let _ = fs::remove_file(staging.join(".complete"));
        let kver = rootfs::kernel_version(&staging)?;
        let m = customize(o, &staging, &signing, &kver)?;
        Ok((
            kver.clone(),
            format!(
                "kernel {kver}; modules: {} kept ({} zstd-compressed), {} removed; left out: {} files, {} KiB (packages {})",
                m.kept,
                m.compressed,
                m.removed,
                m.dropped.files,
                m.dropped.bytes / 1024,
                m.dropped.packages.join(" ")
            ),
        ))
    })?;
    let kernel = fs::read(staging.join("usr/lib/nimbus/boot/vmlinuz")).map_err(io_at(&staging))?;
    let stage1 = st.run("stage1-initramfs", || {
        let b = stage1_initramfs(o, &staging, &kver, &signing)?;
        let n = format!(
            "{} KiB{}",
            b.len() / 1024,
            if o.stage1_init.is_some() {
                ""
            } else {
                ", no /init yet (boot selector: issue #4)"
            }
        );
        Ok((b, n))
    })?;

    // Stage 2 runs from the same initramfs, kexec'd from the slot's own
    // /usr/lib/nimbus/boot, so kernel, modules and init update together.
    let initramfs = staging.join("usr/lib/nimbus/boot/initramfs.img");
    fs::write(&initramfs, &stage1).map_err(io_at(&initramfs))?;

    // USR leaves the staging tree; what remains is the seed of ROOT.
    let usr_dir = work.join("usr");
    let _ = fs::remove_dir_all(&usr_dir);
    fs::rename(staging.join("usr"), &usr_dir).map_err(io_at(&usr_dir))?;
    fs::create_dir(staging.join("usr")).map_err(io_at(&staging))?;
    let slot = st.run("usr", || {
        let s = usr::build(&usr::UsrInputs {
            usr_dir: &usr_dir,
            out_fs: &work.join("usr.erofs"),
            version: &o.version,
            compression: o.compression,
            epoch: o.epoch,
            fs_uuid: seeded(&o.version, "usr-fs"),
            slot_size: o.usr_size,
            keys: &signing.key_refs(),
        })?;
        let n = format!(
            "erofs {} MiB, tree {} KiB, root {}",
            s.data_size >> 20,
            s.tree.len() >> 10,
            hex::encode(s.fields.verity_root)
        );
        Ok((s, n))
    })?;

    let payload_tmp = o.out.join(".usr.img.zst.tmp");
    let payload = st.run("payload", || {
        let p = slot.write_payload(&payload_tmp, o.zstd_level)?;
        let n = format!(
            "{} MiB -> {} MiB (zstd {})",
            p.raw_size >> 20,
            p.compressed_size >> 20,
            o.zstd_level
        );
        Ok((p, n))
    })?;

    let esp_img = work.join("esp.img");
    let oem_img = work.join("oem.img");
    let root_img = work.join("root.img");
    let plan =
        layout::plan(o.disk_size, o.usr_size).map_err(|e| ImageError::Invalid(e.to_string()))?;
    let part = |n: u32| part(&plan, n);
    // The loaders' own files, on the ESP (fixed at install: docs/boot.md).
    let sdboot_path = usr_dir.join("lib/systemd/boot/efi/systemd-bootx64.efi");
    let sdboot = fs::read(&sdboot_path).map_err(io_at(&sdboot_path))?;
    let script = bios::script(KERNEL_CMDLINE).into_bytes();
    let grub_core = st.run("filesystems", || {
        // Stage 1 as copy a, generation 1, with systemd-boot's entry and
        // GRUB's environment (nimbus::esp: how later updates add copy b).
        let mut files = nimbus::esp::initial_files(&o.version.to_string(), KERNEL_CMDLINE)
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        files.push((bios::SCRIPT.to_string(), script.clone()));
        files.push((nimbus::esp::Copy::A.kernel(), kernel.clone()));
        files.push((nimbus::esp::Copy::A.initramfs(), stage1.clone()));
        files.push((nimbus::esp::EFI_LOADER.into(), sdboot.clone()));
        esp::build(
            &esp_img,
            part(1)?.size_bytes(),
            &files,
            &work.join("esp"),
            o.epoch,
        )?;
        let user_data = match &o.user_data {
            Some(ud) => Some(fs::read(ud).map_err(io_at(ud))?),
            None => None,
        };
        oem_image(o, &work, "oem", part(6)?.size_bytes(), user_data.as_deref())?;
        mkfs_ext4(
            &root_img,
            part(9)?.size_bytes(),
            "ROOT",
            seeded(&o.version, "root-fs"),
            &staging,
            o.epoch,
        )?;
        let core = bios::core_image(&work, &bios::embedded_config())?;
        Ok((
            core,
            "ESP (FAT32), GRUB i386-pc core, OEM and ROOT (ext4)".into(),
        ))
    })?;

    let raw_tmp = o.out.join(".nimbus.raw.tmp");
    let usr_slot_sha256 = st.run("disk", || {
        let parts = Parts {
            esp: &esp_img,
            grub_core: &grub_core,
            slot: &slot,
            oem: &oem_img,
            root: &root_img,
        };
        let sha = write_disk(o, &plan, &raw_tmp, &parts, &signing)?;
        Ok((sha, format!("{} GiB sparse", o.disk_size >> 30)))
    })?;

    let want = |f: Format| o.formats.contains(&f);
    let qcow_tmp = o.out.join(".nimbus.qcow2.tmp");
    let box_tmp = o.out.join(".nimbus.box.tmp");
    if want(Format::Qcow2) {
        st.run("qcow2", || {
            let _ = fs::remove_file(&qcow_tmp);
            qcow2(&raw_tmp, &qcow_tmp)?;
            Ok(((), String::new()))
        })?;
    }
    if want(Format::Box) {
        st.run("box", || {
            vagrant::write_box(o, &plan, &work, &raw_tmp, &box_tmp)?;
            Ok(((), "OEM user-data with Vagrant's insecure key".into()))
        })?;
    }

    // Everything built: move into place.
    let mut artifacts = Vec::new();
    let mut place = |tmp: &Path, name: &str| -> Result<(), ImageError> {
        let dest = o.out.join(name);
        fs::rename(tmp, &dest).map_err(io_at(&dest))?;
        artifacts.push(Artifact {
            name: name.into(),
            size: fs::metadata(&dest).map_err(io_at(&dest))?.len(),
            sha256: sha256_file(&dest)?,
        });
        Ok(())
    };
    if want(Format::Raw) {
        place(&raw_tmp, "nimbus.raw")?;
    } else {
        let _ = fs::remove_file(&raw_tmp);
    }
    if want(Format::Qcow2) {
        place(&qcow_tmp, "nimbus.qcow2")?;
    } else {
        let _ = fs::remove_file(&qcow_tmp);
    }
    if want(Format::Box) {
        place(&box_tmp, "nimbus.box")?;
    }
    place(&payload_tmp, "usr.img.zst")?;
    if !o.keep_work {
        let _ = fs::remove_dir_all(&work);
    }

    let report = BuildReport {
        version: o.version.to_string(),
        channel: o.channel.clone(),
        key_ids: signing.keys.iter().map(|k| k.id.to_string()).collect(),
        trust_version: signing.trust.version,
        dev_key: o.dev_key,
        source_date_epoch: o.epoch,
        kernel: kver,
        disk_size: o.disk_size,
        usr_size: o.usr_size,
        usr_compression: o.compression,
        usr_data_size: slot.data_size,
        usr_hash_size: slot.tree.len() as u64,
        verity_root: hex::encode(slot.fields.verity_root),
        usr_slot_sha256,
        payload,
        rootfs_cache: if rootfs.cache_hit {
            "hit".into()
        } else {
            "miss".into()
        },
        stage1_init: o.stage1_init.is_some(),
        artifacts,
        stages: st.times,
        total_seconds: (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    };
    let json =
        serde_json::to_vec_pretty(&report).map_err(|e| ImageError::Invalid(e.to_string()))?;
    // Stage 1 beside the build: the release step publishes it, and
    // update-engine installs it into the ESP's other copy.
    let s1 = o.out.join("stage1");
    fs::create_dir_all(&s1).map_err(io_at(&s1))?;
    for (name, data) in [
        (nimbus::esp::KERNEL, &kernel),
        (nimbus::esp::INITRAMFS, &stage1),
    ] {
        nimbus::durable::write_atomic(&s1.join(name), data, 0o644)
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
    }
    // The release step starts a trust rotation from the set the image
    // carries when the repository has none yet.
    nimbus::durable::write_atomic(&o.out.join("trust.json"), &signing.trust_json(), 0o644)
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    nimbus::durable::write_atomic(&o.out.join("build.json"), &json, 0o644)
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    Ok(report)
}
