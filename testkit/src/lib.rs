//! What Nimbus's tests (and xtask's harnesses) share, defined once:
//!
//! - [`httpd`]: a static HTTP/1.1 server on loopback with Range support,
//!   a request log and faults on purpose;
//! - [`etcd`]: real etcd members (one, or a cluster) on loopback ports;
//! - [`proc`]: running a command with a wall-clock deadline, so that no
//!   test waits on a child process without a bound;
//! - [`libvirt`]: libvirtd in a network namespace of its own, and
//!   `vagrant` run against it, for the Vagrant tests;
//! - [`loopdev`]: loop devices detached on drop;
//! - [`cgpt`]: slot attributes through the real `cgpt`;
//! - [`host`]: a host's disk (GPT, USR slots) and root directory, as
//!   update-engine sees them without a VM;
//! - [`ROOTFS_EPOCH`]: the SOURCE_DATE_EPOCH every image-building test
//!   uses, so they share one cached root filesystem and the image cache.
//!
//! `publish = false`: a development crate, never shipped in USR.

pub mod cgpt;
pub mod etcd;
pub mod host;
pub mod httpd;
pub mod libvirt;
pub mod loopdev;
pub mod proc;

/// SOURCE_DATE_EPOCH of every test that builds an image: one epoch, one
/// cached rootfs, and equal inputs for the image cache.
pub const ROOTFS_EPOCH: &str = "1700000000";
