//! Nimbus shared contracts.
//!
//! Everything that the image builder, the boot selector and the update engine
//! must agree on lives here, and nothing here touches the network:
//!
//! - [`layout`]: the partition table as data.
//! - [`slots`]: the gptprio A/B protocol, as pure functions over attribute words.
//! - [`gpt`]: reading and writing a Nimbus GPT on any [`gpt::BlockDevice`].
//! - [`keys`], [`release`]: release keys, the signed slot descriptor and the
//!   signed channel manifest.
//! - [`trust`]: the trust set file and its rotation chain.
//! - [`durable`]: crash-safe file replacement.
//! - [`verity`], [`delta`]: the dm-verity tree and the delta index built on it.
//! - [`repo`]: paths inside a release repository and the payload framing;
//!   [`paths`]: paths on a host.

pub mod boot;
pub mod chain;
pub mod delta;
pub mod durable;
pub mod esp;
pub mod etcd_keys;
pub mod fleetlock;
pub mod gpt;
pub mod keys;
pub mod layout;
pub mod paths;
pub mod release;
pub mod repo;
pub mod slots;
pub mod swarmconf;
pub mod trust;
pub mod units;
pub mod updateconf;
pub mod verity;

pub use semver::Version;

/// `NIMBUS_BUILD_TAG` at build time (a CI build number), logged by every
/// binary at start. The delta benchmark sets it to rebuild the binaries
/// with a one-line change.
pub const BUILD_TAG: &str = match option_env!("NIMBUS_BUILD_TAG") {
    Some(t) => t,
    None => "",
};
