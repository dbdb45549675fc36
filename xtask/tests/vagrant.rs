//! A real `vagrant up --provider libvirt` of the built box, as a new user
//! runs it: Debian's vagrant and vagrant-libvirt, libvirtd and virtlogd
//! started as daemons inside a network namespace this test makes (so the
//! management network and its DHCP exist only there), and a Vagrantfile
//! that sets only the box, the host name and the libvirt driver (`qemu`:
//! these machines have no usable KVM). The domain boots under
//! vagrant-libvirt's default firmware (SeaBIOS), so GRUB in the MBR is what
//! boots it. Vagrant logs in with its insecure key from the box's OEM
//! user-data, replaces it with its own, sets the host name; then
//! `halt`, a second `up` (with Vagrant's own key only), `ssh`, `reload`,
//! `destroy`.

use std::path::Path;
use std::time::Instant;

use nimbus_testkit::libvirt::{ok, run, Libvirt, Scratch};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
#[ignore = "vm tier: cargo xtask vmtest"]
fn stock_vagrant_up_halt_up_ssh_destroy() {
    let sc = Scratch::new(
        env!("CARGO_BIN_EXE_xtask"),
        env!("CARGO_TARGET_TMPDIR"),
        "vagrant",
        "1.0.0",
    );
    let (boxfile, home, project) = (&sc.boxfile, &sc.home, &sc.project);
    std::fs::write(
        project.join("Vagrantfile"),
        "Vagrant.configure(\"2\") do |config|\n  config.vm.box = \"nimbus-test\"\n  config.vm.hostname = \"nimbus-vagrant\"\n  config.vm.provider :libvirt do |libvirt|\n    libvirt.driver = \"qemu\"\n  end\nend\n",
    )
    .unwrap();
    let lv = Libvirt::start("vagrant");
    let vp = lv.project(project, home);
    let vagrant = |args: &[&str]| vp.vagrant(args);
    ok(&mut vagrant(&[
        "box",
        "add",
        "--name",
        "nimbus-test",
        s(boxfile),
    ]));

    let t = Instant::now();
    let up = ok(&mut vagrant(&["up", "--provider", "libvirt"]));
    eprintln!("vagrant up: {:.0} s", t.elapsed().as_secs_f64());
    assert!(
        up.contains("Inserting generated public key within guest"),
        "Vagrant did not replace its insecure key:\n{up}"
    );
    let out = ok(&mut vagrant(&[
        "ssh",
        "-c",
        "hostname; sudo updatectl status; cat /etc/issue; grep PRETTY_NAME /etc/os-release",
    ]));
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| l.trim() == "nimbus-vagrant"),
        "{out}"
    );
    assert!(out.contains("USR-A"), "updatectl status: {out}");
    assert!(out.contains("Nimbus 1.0.0"), "{out}");
    // As the vagrant user, without sudo: status answers (as Flatcar's
    // GetStatus does for anyone), a change is refused with exit 77 naming
    // what it needs.
    let out = ok(&mut vagrant(&[
        "ssh",
        "-c",
        "updatectl status; updatectl metrics | grep -c '^nimbus_'; updatectl check 2>&1; echo exit=$?",
    ]));
    assert!(out.contains("USR-A"), "updatectl status as vagrant: {out}");
    assert!(
        out.contains("exit=77")
            && out.contains("needs root or membership of the group nimbus-admin"),
        "updatectl check as vagrant: {out}"
    );
    // The insecure key is gone from the guest; Vagrant's own is there.
    let keys = ok(&mut vagrant(&["ssh", "-c", "cat ~/.ssh/authorized_keys"]));
    let insecure = nimbus_image::pipeline::VAGRANT_INSECURE_KEY
        .split_whitespace()
        .nth(1)
        .unwrap();
    assert!(!keys.contains(insecure), "{keys}");

    let t = Instant::now();
    ok(&mut vagrant(&["halt"]));
    eprintln!("vagrant halt: {:.0} s", t.elapsed().as_secs_f64());
    let status = ok(&mut vagrant(&["status"]));
    assert!(
        status.contains("shutoff") || status.contains("not running"),
        "{status}"
    );

    // Second boot: cloud-config runs again with the insecure key in the OEM
    // user-data; Vagrant gets in with its own key only.
    let t = Instant::now();
    ok(&mut vagrant(&["up"]));
    eprintln!("second vagrant up: {:.0} s", t.elapsed().as_secs_f64());
    let out = ok(&mut vagrant(&[
        "ssh",
        "-c",
        "hostname; cat ~/.ssh/authorized_keys",
    ]));
    assert!(out.contains("nimbus-vagrant"), "{out}");
    assert!(
        !out.contains(insecure),
        "the insecure key came back after a reboot:\n{out}"
    );

    let t = Instant::now();
    ok(&mut vagrant(&["reload"]));
    eprintln!("vagrant reload: {:.0} s", t.elapsed().as_secs_f64());
    let out = ok(&mut vagrant(&["ssh", "-c", "hostname"]));
    assert!(out.contains("nimbus-vagrant"), "{out}");

    ok(&mut vagrant(&["destroy", "-f"]));
    let status = ok(&mut vagrant(&["status"]));
    assert!(status.contains("not created"), "{status}");
    let _ = run(&mut vagrant(&["box", "remove", "-f", "nimbus-test"]));
}
