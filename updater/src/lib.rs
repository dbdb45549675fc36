//! nimbus-updater: the `update-engine` daemon and the `updatectl` client
//! (docs/formats.md, "Channel manifest"; docs/update-engine.md, "Configuration";
//! docs/update-engine.md).
//!
//! Pure decisions (`choose`, `config`) are apart from effects: HTTP
//! (`fetch`), the slot (`target`), cgroups (`iolimit`), persisted state
//! (`state`). `apply` streams a payload, `delta` rebuilds a slot from
//! local blocks and fetched frames, both through the one slot writer
//! (`writer`); `engine` ties a check to an install, `hooks` run around the
//! reboot it causes, `api` serves the local socket. The etcd client (the
//! reboot lock, leader hand-over) is the `nimbus-etcd` crate.

pub mod access;
pub mod api;
pub mod apply;
pub mod choose;
pub mod config;
pub mod dbus;
pub mod delta;
pub mod engine;
pub mod error;
pub mod esp;
pub mod fetch;
pub mod fleetlock;
pub mod hooks;
pub mod iolimit;
pub mod metrics;
pub mod policy;
pub mod sha;
pub mod state;
pub mod status;
pub mod target;
pub mod writer;
