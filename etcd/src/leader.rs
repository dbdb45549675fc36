//! Handing etcd leadership away before this host reboots.
//!
//! etcd hands leadership over by itself when it is stopped, but that
//! happens during the shutdown, while every other service stops too; on a
//! busy host the hand-over (or, if it fails, the election after the leader
//! vanished) left the other members without a leader for longer than a
//! client waits. Done from a pre-reboot hook instead, while the host is
//! drained and quiet, the cluster keeps a leader throughout and the member
//! that then stops is a follower, whose going nobody notices.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::lock::{LockClient, LockError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    /// Empty for a member that was added but has not started yet.
    pub name: String,
    pub learner: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDown {
    /// Another member leads: nothing to do.
    NotLeader {
        me: String,
        leader: String,
    },
    /// No started voting member to hand leadership to (a one-member cluster).
    Alone {
        me: String,
    },
    Moved {
        from: String,
        to: String,
    },
}

impl std::fmt::Display for StepDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepDown::NotLeader { me, leader } => {
                write!(
                    f,
                    "etcd member {me} does not lead ({leader} does); nothing to move"
                )
            }
            StepDown::Alone { me } => write!(
                f,
                "etcd member {me} leads and no other started voting member can take over"
            ),
            StepDown::Moved { from, to } => {
                write!(f, "etcd leadership moved from {from} to {to}")
            }
        }
    }
}

/// etcd's JSON gateway writes 64-bit ids as strings.
fn id_of(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// The members of a `/v3/cluster/member/list` answer.
pub fn parse_members(v: &Value) -> Result<Vec<Member>, String> {
    let list = v["members"]
        .as_array()
        .ok_or_else(|| "the member list has no \"members\"".to_string())?;
    list.iter()
        .map(|m| {
            Ok(Member {
                id: id_of(&m["ID"]).ok_or_else(|| format!("a member without an ID: {m}"))?,
                name: m["name"].as_str().unwrap_or_default().to_string(),
                learner: m["isLearner"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// The member to hand leadership to: a started voting member other than
/// `me`, the first by name so that every try picks the same one.
pub fn transferee(me: u64, members: &[Member]) -> Option<&Member> {
    members
        .iter()
        .filter(|m| m.id != me && !m.learner && !m.name.is_empty())
        .min_by(|a, b| a.name.cmp(&b.name))
}

fn name_of(id: u64, members: &[Member]) -> String {
    members
        .iter()
        .find(|m| m.id == id && !m.name.is_empty())
        .map(|m| m.name.clone())
        .unwrap_or_else(|| format!("{id:x}"))
}

/// (this member, the leader) as the endpoint reports them.
fn status(c: &LockClient) -> Result<(u64, u64), LockError> {
    let v = c.post("/v3/maintenance/status", &json!({}))?;
    let bad = |what: &str| LockError::Protocol {
        endpoint: c.endpoints(),
        reason: format!("the status answer has no {what}: {v}"),
    };
    let me = id_of(&v["header"]["member_id"]).ok_or_else(|| bad("header.member_id"))?;
    let leader = id_of(&v["leader"]).ok_or_else(|| bad("leader"))?;
    Ok((me, leader))
}

/// If the member behind `c`'s (single) endpoint leads, make another member
/// the leader and wait until the endpoint says it is.
pub fn step_down(c: &LockClient) -> Result<StepDown, LockError> {
    let (me, leader) = status(c)?;
    let v = c.post("/v3/cluster/member/list", &json!({}))?;
    let members = parse_members(&v).map_err(|reason| LockError::Protocol {
        endpoint: c.endpoints(),
        reason,
    })?;
    let me_name = name_of(me, &members);
    if leader != me {
        return Ok(StepDown::NotLeader {
            me: me_name,
            leader: name_of(leader, &members),
        });
    }
    let Some(to) = transferee(me, &members) else {
        return Ok(StepDown::Alone { me: me_name });
    };
    // The leader itself must be asked; `c` talks to this member only.
    c.post(
        "/v3/maintenance/transfer-leadership",
        &json!({ "targetID": to.id.to_string() }),
    )?;
    // etcd answers once the transferee has won; a follower's view (this
    // one's, now) may lag a heartbeat behind.
    let t0 = Instant::now();
    loop {
        let (_, now) = status(c)?;
        if now != me {
            ready_for_reads(c);
            return Ok(StepDown::Moved {
                from: me_name,
                to: name_of(now, &members),
            });
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(LockError::Protocol {
                endpoint: c.endpoints(),
                reason: format!(
                    "etcd accepted the transfer to {} but {me_name} still leads after 10 s",
                    to.name
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait (at most 5 s) until a linearizable read through this member
/// succeeds. A new leader serves reads only once it has committed an entry
/// of its own term; until then every member answers reads with "leader
/// changed" (HTTP 503 from the gateway). Seen in the cluster test: the
/// reboot that followed a transfer at once left both other members failing
/// reads for a second. Not an error if it never does: the transfer itself
/// happened, and etcd hands over again as it stops.
fn ready_for_reads(c: &LockClient) {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode("nimbus/leader-ready");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if c.post("/v3/kv/range", &json!({ "key": key })).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u64, name: &str, learner: bool) -> Member {
        Member {
            id,
            name: name.into(),
            learner,
        }
    }

    #[test]
    fn members_parse_from_etcds_json() {
        let v: Value = serde_json::from_str(
            r#"{"header":{"member_id":"1"},"members":[
                {"ID":"10276657743932975437","name":"h1","peerURLs":["http://10.10.0.11:2380"]},
                {"ID":"2","name":"","peerURLs":["http://10.10.0.12:2380"]},
                {"ID":"3","name":"h3","isLearner":true}]}"#,
        )
        .expect("json");
        assert_eq!(
            parse_members(&v).expect("members"),
            vec![
                m(10276657743932975437, "h1", false),
                m(2, "", false),
                m(3, "h3", true)
            ]
        );
        assert!(parse_members(&json!({"header": {}})).is_err());
        assert!(parse_members(&json!({"members": [{"name": "h1"}]})).is_err());
    }

    #[test]
    fn the_transferee_is_a_started_voter_other_than_me() {
        let all = [
            m(1, "h1", false),
            m(2, "", false),
            m(3, "h3", true),
            m(4, "h4", false),
            m(5, "h0", false),
        ];
        assert_eq!(transferee(5, &all).map(|m| m.id), Some(1));
        assert_eq!(transferee(1, &all).map(|m| m.id), Some(5));
        assert_eq!(
            transferee(1, &all[..3]),
            None,
            "unstarted and learner cannot lead"
        );
        assert_eq!(transferee(1, &all[..1]), None);
    }
}
