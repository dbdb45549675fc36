//! The FleetLock client (`REBOOT_STRATEGY=fleetlock`): Zincati's reboot
//! lock protocol, as `nimbus::fleetlock` defines it, against any server
//! that speaks it (airlock, poseidon/fleetlock, `nimbus-fleetlock`).

use std::io::Read;
use std::time::Duration;

use nimbus::fleetlock::{ErrorBody, Request, HEADER, HEADER_VALUE, PRE_REBOOT, STEADY_STATE};

use crate::engine::RebootLock;
use crate::error::UpdateError;
use crate::policy::Lock;

/// FLEETLOCK_URL and FLEETLOCK_GROUP, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLockConfig {
    /// The base URL, without a trailing slash.
    pub url: String,
    pub group: String,
}

/// Total time for one call, answer included.
const DEADLINE: Duration = Duration::from_secs(10);
/// A server's answer is a small JSON object; more is not read.
const MAX_ANSWER: u64 = 64 * 1024;

pub struct Client {
    http: reqwest::blocking::Client,
    cfg: FleetLockConfig,
    id: String,
}

impl Client {
    pub fn new(cfg: &FleetLockConfig, id: String) -> Result<Client, UpdateError> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(DEADLINE)
            .user_agent(concat!("nimbus-update-engine/", env!("CARGO_PKG_VERSION")))
            // The protocol has no redirects; a server that sends one is
            // not answering for the lock.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| UpdateError::Network {
                url: cfg.url.clone(),
                reason: format!("building the HTTP client: {e}"),
            })?;
        Ok(Client {
            http,
            cfg: cfg.clone(),
            id,
        })
    }

    /// POST one operation. `Ok(())` on 200; `Err(Refused)` with the
    /// server's `{"kind","value"}` on any other status; `Err(Unreachable)`
    /// when no answer came.
    fn call(&self, op: &str) -> Result<(), Outcome> {
        let url = format!("{}/{op}", self.cfg.url);
        let body = Request::new(&self.id, &self.cfg.group);
        let resp = self
            .http
            .post(&url)
            .header(HEADER, HEADER_VALUE)
            .json(&body)
            .send()
            .map_err(|e| Outcome::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status();
        if status == reqwest::StatusCode::OK {
            return Ok(());
        }
        let mut text = Vec::new();
        let _ = resp.take(MAX_ANSWER).read_to_end(&mut text);
        let why = match serde_json::from_slice::<ErrorBody>(&text) {
            Ok(e) => format!("{}: {}", e.kind, e.value),
            Err(_) => format!(
                "HTTP {status}: {}",
                crate::hooks::escape_controls(String::from_utf8_lossy(&text).trim())
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        };
        let why = format!("{url} (group {}): {why}", self.cfg.group);
        // 409: the semaphore is full (the protocol's answer while others
        // hold it), not a failure of the server.
        if status == reqwest::StatusCode::CONFLICT {
            return Err(Outcome::Taken(why));
        }
        Err(Outcome::Refused(why))
    }
}

enum Outcome {
    Unreachable(String),
    Refused(String),
    Taken(String),
}

impl RebootLock for Client {
    fn backend(&self) -> &'static str {
        "fleetlock"
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn key(&self) -> String {
        format!("fleetlock {} group {}", self.cfg.url, self.cfg.group)
    }
    /// FleetLock has no read: a slot is asked for by taking it (a holder
    /// asking again is told yes).
    fn status(&self) -> Lock {
        Lock::Free
    }
    fn acquire(&self) -> Lock {
        match self.call(PRE_REBOOT) {
            Ok(()) => Lock::Held,
            Err(Outcome::Refused(why)) => Lock::Refused(why),
            Err(Outcome::Taken(why)) => Lock::Taken(why),
            Err(Outcome::Unreachable(why)) => Lock::Unavailable(why),
        }
    }
    fn release(&self) -> Result<bool, String> {
        match self.call(STEADY_STATE) {
            // The protocol does not say whether a slot was held.
            Ok(()) => Ok(true),
            Err(Outcome::Refused(why) | Outcome::Taken(why) | Outcome::Unreachable(why)) => {
                Err(why)
            }
        }
    }
}
