//! What Nimbus's tests (and xtask's harnesses) share, defined once:
//!
//! - [`httpd`]: a static HTTP/1.1 server on loopback with Range support,
//!   a request log and faults on purpose;
//! - [`etcd`]: real etcd members (one, or a cluster) on loopback ports;
//! - [`proc`]: running a command with a wall-clock deadline, so that no
//!   test waits on a child process without a bound.
//!
//! `publish = false`: a development crate, never shipped in USR.

pub mod etcd;
pub mod httpd;
pub mod proc;
