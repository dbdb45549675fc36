//! Every path on a host that more than one part of Nimbus knows, relative
//! to the root (`/` on a host, a directory in tests and host mode).

/// update.conf, the admin's layer over the image's.
pub const UPDATE_CONF_ETC: &str = "etc/nimbus/update.conf";
pub const UPDATE_CONF_USR: &str = "usr/share/nimbus/update.conf";
/// The trust set built into USR, and stage 1's copy of it.
pub const TRUST_USR: &str = "usr/share/nimbus/trust.json";
pub const TRUST_STAGE1: &str = "etc/nimbus/trust.json";
/// Trust rotations update-engine learned (`<n>.json` + `.sig`).
pub const TRUST_CHAIN_ROOT: &str = "var/lib/nimbus/trust";
/// update-engine's persisted state (serials, checkpoints, rollbacks).
pub const ENGINE_STATE: &str = "var/lib/nimbus/update-engine.json";
/// mark-good's record of a failed health check, for update-engine.
pub const HEALTH_FAILURE: &str = "var/lib/nimbus/health-failure.json";
/// A stage 1 that booted a good slot but is not yet the loaders' default,
/// and why (nimbus::esp::BlessFailure).
pub const STAGE1_BLESS_FAILURE: &str = "var/lib/nimbus/stage1-bless-failure.json";
/// update-engine's local API socket.
pub const ENGINE_SOCKET: &str = "run/nimbus/update-engine.sock";
/// update-engine's metrics: Prometheus text to whoever connects (any local
/// user, as Zincati's `metrics.promsock`).
pub const ENGINE_METRICS_SOCKET: &str = "run/nimbus/metrics.promsock";
/// The command line stage 1 hands to stage 2 when it continues as stage 2
/// in the same kernel (no kexec): what the kexec'd kernel's /proc/cmdline
/// would have said. Written by PID 1 on the /run it passes to systemd;
/// read through `nimbus::boot::booted_cmdline`.
pub const BOOT_CMDLINE: &str = "run/nimbus/boot-cmdline";
/// Where update-engine mounts the ESP when nothing else has.
pub const ENGINE_MOUNTS: &str = "run/nimbus/mnt";

/// Hook directories: `<kind>.d/` under each; /etc overrides /usr by name.
pub const HOOKS_USR: &str = "usr/lib/nimbus/hooks";
pub const HOOKS_ETC: &str = "etc/nimbus/hooks";
/// Touched when a staged update waits for a reboot nobody will do for it
/// (REBOOT_STRATEGY=off): kured and similar tools watch this file.
pub const REBOOT_REQUIRED: &str = "run/reboot-required";
/// Swarm membership from cloud-config (`nimbus.swarm`), read by nimbus-swarm.
pub const SWARM_CONF: &str = "etc/nimbus/swarm.conf";
