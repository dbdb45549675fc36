//! The etcd keys Nimbus hosts share, defined once for every writer and
//! reader (update-engine, nimbus-swarm, the cluster harness).

/// locksmith's reboot semaphore (etcd v2 layout, kept for compatibility
/// with CoreOS fleets): `{"semaphore":N,"max":M,"holders":[...]}`.
pub const REBOOT_LOCK: &str = "coreos.com/updateengine/rebootlock/semaphore";

/// The semaphore of `REBOOT_GROUP` (update.conf), or the default one.
pub fn reboot_lock(group: Option<&str>) -> String {
    match group {
        Some(g) if !g.is_empty() => {
            format!("coreos.com/updateengine/rebootlock/groups/{g}/semaphore")
        }
        _ => REBOOT_LOCK.to_string(),
    }
}

/// Swarm join tokens, `<this>/worker`, sealed with the cluster secret
/// (nimbus-swarm's `seal`). `<this>/manager` is never written; a manager
/// that finds one (left by an older release) deletes it and rotates the
/// manager token.
pub const SWARM_JOIN_TOKEN: &str = "nimbus/swarm/join-token";

/// A host that joined as a worker and is to be a manager asks here,
/// `<this>/<hostname>` = its swarm node ID; a manager promotes the node
/// when the hostname is in its `MANAGERS` and the IDs agree.
pub const SWARM_PROMOTE: &str = "nimbus/swarm/promote";

/// With `INIT=auto`, the manager that created this key (only if it did not
/// exist) starts the swarm; its value is that host's swarm address
/// (`ADDR:2377`), which the others join. Deleting it by hand lets the next
/// host to start a swarm claim it, for a cluster rebuilt from scratch.
pub const SWARM_FOUNDER: &str = "nimbus/swarm/founder";

#[cfg(test)]
mod tests {
    #[test]
    fn a_group_has_its_own_semaphore() {
        assert_eq!(super::reboot_lock(None), super::REBOOT_LOCK);
        assert_eq!(super::reboot_lock(Some("")), super::REBOOT_LOCK);
        assert_eq!(
            super::reboot_lock(Some("db")),
            "coreos.com/updateengine/rebootlock/groups/db/semaphore"
        );
    }
}
