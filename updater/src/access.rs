//! Who may do what over update-engine's socket: any local user reads
//! (status, slots, trust, metrics), as Flatcar lets anyone call `GetStatus`;
//! only root, update-engine's own user, or a member of `nimbus-admin`
//! changes anything (check, update, channel, rollback, mark-good, cancel).
//! Decided from the peer's credentials (SO_PEERCRED), which the kernel
//! fills in at connect time and a client cannot forge.

/// The group whose members may change what update-engine does.
pub const ADMIN_GROUP: &str = "nimbus-admin";

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Change,
}

/// The admin group as the system's group database has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminGroup {
    pub gid: u32,
    /// Supplementary members by user name.
    pub members: Vec<String>,
}

/// The pure rule. `peer_name` is the peer uid's user name, if it has one.
pub fn decide(
    peer_uid: u32,
    peer_gid: u32,
    peer_name: Option<&str>,
    own_uid: u32,
    admin: Option<&AdminGroup>,
) -> Access {
    if peer_uid == 0 || peer_uid == own_uid {
        return Access::Change;
    }
    let Some(g) = admin else {
        return Access::Read;
    };
    let member = peer_gid == g.gid || peer_name.is_some_and(|n| g.members.iter().any(|m| m == n));
    if member {
        Access::Change
    } else {
        Access::Read
    }
}

/// Look the peer up in the system's user and group databases. A database
/// that cannot be read grants nothing beyond reading.
pub fn of_peer(peer_uid: u32, peer_gid: u32) -> Access {
    use nix::unistd::{Group, Uid, User};
    let own = nix::unistd::geteuid().as_raw();
    if peer_uid == 0 || peer_uid == own {
        return Access::Change;
    }
    let admin = match Group::from_name(ADMIN_GROUP) {
        Ok(Some(g)) => Some(AdminGroup {
            gid: g.gid.as_raw(),
            members: g.mem,
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("looking up group {ADMIN_GROUP}: {e}");
            None
        }
    };
    let name = match User::from_uid(Uid::from_raw(peer_uid)) {
        Ok(Some(u)) => Some(u.name),
        _ => None,
    };
    decide(peer_uid, peer_gid, name.as_deref(), own, admin.as_ref())
}

/// The same rule for a uid alone (a D-Bus caller, whose uid the bus daemon
/// reports): its primary group comes from the user database; an unknown
/// uid has no group that could grant more.
pub fn of_uid(uid: u32) -> Access {
    use nix::unistd::{Uid, User};
    let gid = match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => u.gid.as_raw(),
        _ => u32::MAX,
    };
    of_peer(uid, gid)
}

/// Strip `user:password@` from every URL in `s`: a SERVER or an error
/// message may carry credentials, and a reader who is not an admin must
/// not learn them.
pub fn redact_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or blank.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***@");
                out.push_str(&authority[at + 1..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `redact_userinfo` over every string of a JSON value.
pub fn redact_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.contains('@') => *s = redact_userinfo(s),
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(redact_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admins() -> AdminGroup {
        AdminGroup {
            gid: 990,
            members: vec!["alice".into()],
        }
    }

    #[test]
    fn root_and_the_engines_own_user_change() {
        assert_eq!(decide(0, 0, None, 0, None), Access::Change);
        assert_eq!(decide(500, 500, None, 500, None), Access::Change);
    }

    #[test]
    fn others_read_unless_in_the_admin_group() {
        let g = admins();
        assert_eq!(decide(1000, 1000, Some("bob"), 0, Some(&g)), Access::Read);
        assert_eq!(decide(1000, 1000, Some("bob"), 0, None), Access::Read);
        assert_eq!(decide(1000, 990, Some("bob"), 0, Some(&g)), Access::Change);
        assert_eq!(
            decide(1001, 1001, Some("alice"), 0, Some(&g)),
            Access::Change
        );
        // A uid without a name is not a member by name.
        assert_eq!(decide(1002, 1002, None, 0, Some(&g)), Access::Read);
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_userinfo("fetching https://u:secret@repo.example/x failed"),
            "fetching https://***@repo.example/x failed"
        );
        assert_eq!(
            redact_userinfo("http://a@b@host:80?q=1 and ftp://plain/x"),
            "http://***@host:80?q=1 and ftp://plain/x"
        );
        assert_eq!(redact_userinfo("no url, user@host"), "no url, user@host");
        let mut v = serde_json::json!({"server": "https://t:k@h/", "n": [1, "x://y:z@w"]});
        redact_json(&mut v);
        assert_eq!(v["server"], "https://***@h/");
        assert_eq!(v["n"][1], "x://***@w");
    }
}
