//! The Vagrant box: the raw disk with an OEM partition of its own (the
//! user-data with Vagrant's insecure key), as qcow2, with metadata and a
//! Vagrantfile for the libvirt provider.

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;

use nimbus::layout::Placed;

use super::disk::{copy_sparse, oem_image, part, qcow2};
use super::{io_at, BuildOptions};
use crate::{run_tool, ImageError};

pub const VAGRANT_INSECURE_KEY: &str = include_str!("../../vagrant/insecure_key.pub");

pub(super) fn vagrant_user_data() -> String {
    format!(
        "#cloud-config\n# Vagrant build: `vagrant up` logs in as core with Vagrant's insecure key\n# and replaces it with a key of its own (cloud-config keeps that change).\nssh_authorized_keys:\n  - {}\n",
        VAGRANT_INSECURE_KEY.trim()
    )
}

pub(super) const VAGRANTFILE: &str = r#"# Nimbus Vagrant box (libvirt provider).
Vagrant.configure("2") do |config|
  config.ssh.username = "core"
  config.vm.synced_folder ".", "/vagrant", disabled: true
  config.vm.provider :libvirt do |libvirt|
    libvirt.memory = 2048
    libvirt.cpus = 2
    # libvirt's default domain type is kvm; without a usable /dev/kvm take
    # QEMU's emulator (a Vagrantfile that sets libvirt.driver wins).
    kvm = File.exist?("/dev/kvm") && File.readable?("/dev/kvm") && File.writable?("/dev/kvm")
    libvirt.driver = "qemu" unless kvm
  end
end
"#;

/// Write the box to `out` (a new file) from the raw disk `raw`.
pub(super) fn write_box(
    o: &BuildOptions,
    plan: &[Placed],
    work: &Path,
    raw: &Path,
    out: &Path,
) -> Result<(), ImageError> {
    // The box differs from nimbus.raw only in its OEM partition: the
    // user-data of the Vagrant build (Vagrant's insecure key for `core`,
    // which Vagrant replaces with its own on first `up`).
    let user_data = match &o.user_data {
        Some(own) => fs::read(own).map_err(io_at(own))?,
        None => vagrant_user_data().into_bytes(),
    };
    let oem = part(plan, 6)?;
    let oem_img = oem_image(o, work, "oem-vagrant", oem.size_bytes(), Some(&user_data))?;
    let box_raw = work.join("box.raw");
    let _ = fs::remove_file(&box_raw);
    run_tool(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(raw)
            .arg(&box_raw),
        "cp",
    )?;
    let mut f = File::options()
        .write(true)
        .open(&box_raw)
        .map_err(io_at(&box_raw))?;
    copy_sparse(&oem_img, &mut f, oem.offset_bytes(), oem.size_bytes())?;
    f.sync_all().map_err(io_at(&box_raw))?;
    let box_qcow = work.join("box.qcow2");
    let _ = fs::remove_file(&box_qcow);
    qcow2(&box_raw, &box_qcow)?;
    let _ = fs::remove_file(&box_raw);
    let f = File::create(out).map_err(io_at(out))?;
    let mut t = tar::Builder::new(f);
    let meta = serde_json::json!({"provider": "libvirt", "format": "qcow2", "virtual_size": o.disk_size.div_ceil(1 << 30)});
    let add = |t: &mut tar::Builder<File>, name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(o.epoch);
        h.set_cksum();
        t.append_data(&mut h, name, data)
    };
    add(&mut t, "metadata.json", meta.to_string().as_bytes()).map_err(io_at(out))?;
    add(&mut t, "Vagrantfile", VAGRANTFILE.as_bytes()).map_err(io_at(out))?;
    let mut q = File::open(&box_qcow).map_err(io_at(&box_qcow))?;
    t.append_file("box.img", &mut q).map_err(io_at(out))?;
    t.into_inner()
        .and_then(|f| f.sync_all())
        .map_err(io_at(out))
}
