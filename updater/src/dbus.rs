//! Flatcar's D-Bus interface, for the tools that read update_engine over
//! the system bus (flatcar-linux-update-operator's agent, exporters):
//! bus name `com.coreos.update1`, object `/com/coreos/update1`, interface
//! `com.coreos.update1.Manager` with `AttemptUpdate()`, `ResetStatus()`,
//! `GetStatus()` (five out arguments `x d s s x`) and the signal
//! `StatusUpdate` carrying the same five, sent on every change of them.
//!
//! A view over the engine, never an owner: `GetStatus` reads the status
//! board ([`Shared`]), and the two methods that change something go to the
//! engine thread as [`Request`]s, as the socket's do. Who may call them is
//! decided twice: by the bus's policy (`updater/dbus/com.coreos.update1.conf`)
//! and here, from the caller's uid as the bus daemon reports it, by the
//! socket's rule ([`crate::access`]): a bus with a looser policy (a session
//! bus, a test's) still cannot make a stranger update the host.

use std::sync::mpsc::{channel, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zbus::fdo;
use zbus::message::Header;
use zbus::names::BusName;
use zbus::object_server::SignalEmitter;

use crate::access::{self, Access};
use crate::api::{Command, Request, Response};
use crate::engine::Shared;
use crate::status::{State, Status};

/// The well-known name update-engine owns on the bus.
pub const BUS_NAME: &str = "com.coreos.update1";
/// Where the manager object lives.
pub const OBJECT_PATH: &str = "/com/coreos/update1";
/// The interface, as Flatcar names it.
pub const INTERFACE: &str = "com.coreos.update1.Manager";

/// `GetStatus`'s five values, in Flatcar's order.
#[derive(Debug, Clone, PartialEq)]
pub struct BusStatus {
    /// Seconds since the epoch of the last check, 0 before the first.
    pub last_checked_time: i64,
    /// The download's fraction, 0.0 to 1.0.
    pub progress: f64,
    /// `UPDATE_STATUS_*`.
    pub current_operation: String,
    /// The version offered, being installed or staged; `0.0.0` when none
    /// (what Flatcar's update_engine reports then).
    pub new_version: String,
    /// The payload's size in bytes, 0 when unknown.
    pub new_size: i64,
}

/// Flatcar's status string for a state: `UPDATE_STATUS_` and the state's
/// name (the socket's JSON carries the name without the prefix).
pub fn operation(s: State) -> &'static str {
    match s {
        State::Idle => "UPDATE_STATUS_IDLE",
        State::CheckingForUpdate => "UPDATE_STATUS_CHECKING_FOR_UPDATE",
        State::UpdateAvailable => "UPDATE_STATUS_UPDATE_AVAILABLE",
        State::Downloading => "UPDATE_STATUS_DOWNLOADING",
        State::Verifying => "UPDATE_STATUS_VERIFYING",
        State::Finalizing => "UPDATE_STATUS_FINALIZING",
        State::UpdatedNeedReboot => "UPDATE_STATUS_UPDATED_NEED_REBOOT",
        State::ReportingErrorEvent => "UPDATE_STATUS_REPORTING_ERROR_EVENT",
    }
}

impl BusStatus {
    pub fn of(st: &Status) -> BusStatus {
        // Once installed, the size is what the install fetched (the delta's
        // frames, or the whole payload), from its report.
        let fetched = st
            .last_apply
            .as_ref()
            .filter(|a| st.new_version.as_deref() == Some(a.version.as_str()))
            .map_or(0, |a| a.downloaded);
        let (progress, size) = match &st.progress {
            Some(p) if p.total > 0 => ((p.done as f64 / p.total as f64).clamp(0.0, 1.0), p.total),
            Some(p) => (0.0, p.total),
            None if st.state == State::UpdatedNeedReboot => (1.0, fetched),
            None => (0.0, 0),
        };
        BusStatus {
            last_checked_time: st.last_check.map_or(0, |t| t.timestamp()),
            progress,
            current_operation: operation(st.state).to_string(),
            new_version: st.new_version.clone().unwrap_or_else(|| "0.0.0".into()),
            new_size: i64::try_from(size).unwrap_or(i64::MAX),
        }
    }

    fn tuple(self) -> (i64, f64, String, String, i64) {
        (
            self.last_checked_time,
            self.progress,
            self.current_operation,
            self.new_version,
            self.new_size,
        )
    }
}

/// The object served at [`OBJECT_PATH`].
struct Manager {
    shared: Arc<Shared>,
    // mpsc::Sender is Send but the interface must be Sync.
    engine: Mutex<Sender<Command>>,
}

/// How long `ResetStatus` waits for the engine thread, which is idle in
/// every state where a reset is allowed.
const RESET_WAIT: Duration = Duration::from_secs(20);

impl Manager {
    /// The caller's right, from its uid as the bus daemon knows it.
    async fn access_of(conn: &zbus::Connection, hdr: &Header<'_>) -> fdo::Result<Access> {
        let sender = hdr
            .sender()
            .ok_or_else(|| fdo::Error::AccessDenied("a call without a sender".into()))?;
        let dbus = fdo::DBusProxy::new(conn).await?;
        let uid = dbus
            .get_connection_unix_user(BusName::Unique(sender.to_owned()))
            .await?;
        Ok(access::of_uid(uid))
    }

    async fn require_change(
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        what: &str,
    ) -> fdo::Result<()> {
        match Self::access_of(conn, hdr).await? {
            Access::Change => Ok(()),
            Access::Read => Err(fdo::Error::AccessDenied(format!(
                "{what} needs root or membership of the group {}; any user may call GetStatus",
                access::ADMIN_GROUP
            ))),
        }
    }

    fn send(&self, request: Request) -> fdo::Result<std::sync::mpsc::Receiver<Response>> {
        let (tx, rx) = channel();
        let engine = self
            .engine
            .lock()
            .map_err(|_| fdo::Error::Failed("update-engine's command queue is poisoned".into()))?;
        engine
            .send(Command { request, reply: tx })
            .map_err(|_| fdo::Error::Failed("update-engine is shutting down".into()))?;
        Ok(rx)
    }
}

#[zbus::interface(name = "com.coreos.update1.Manager")]
impl Manager {
    /// Check now and install what the channel offers, as Flatcar's: returns
    /// at once; the status and its signals tell how it goes.
    async fn attempt_update(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        Self::require_change(conn, &hdr, "AttemptUpdate").await?;
        tracing::info!("D-Bus: AttemptUpdate");
        // The answer is not awaited: the receiver goes and the engine's
        // reply is dropped.
        self.send(Request::Apply { wait: false }).map(drop)
    }

    /// Back to idle: clears a reported error, or undoes a staged update
    /// (the booted slot stays first; the staged one is made unbootable).
    /// Refused while the engine is checking or installing.
    async fn reset_status(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> fdo::Result<()> {
        Self::require_change(conn, &hdr, "ResetStatus").await?;
        let state = self.shared.snapshot().state;
        match state {
            State::Idle => return Ok(()),
            State::ReportingErrorEvent | State::UpdatedNeedReboot | State::UpdateAvailable => {}
            busy => {
                return Err(fdo::Error::Failed(format!(
                    "ResetStatus is not allowed in {}",
                    operation(busy)
                )))
            }
        }
        tracing::info!("D-Bus: ResetStatus in {}", operation(state));
        let rx = self.send(Request::ResetStatus)?;
        let deadline = Instant::now() + RESET_WAIT;
        loop {
            match rx.try_recv() {
                Ok(r) if r.ok => return Ok(()),
                Ok(r) => {
                    return Err(fdo::Error::Failed(
                        r.error
                            .map_or_else(|| "ResetStatus failed".into(), |e| e.message),
                    ))
                }
                Err(TryRecvError::Disconnected) => {
                    return Err(fdo::Error::Failed(
                        "update-engine dropped the request".into(),
                    ))
                }
                Err(TryRecvError::Empty) if Instant::now() >= deadline => {
                    return Err(fdo::Error::Failed(format!(
                        "update-engine did not answer within {} s",
                        RESET_WAIT.as_secs()
                    )))
                }
                Err(TryRecvError::Empty) => {
                    async_io::Timer::after(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Anyone may read it (the bus policy allows it to every user).
    #[zbus(out_args(
        "last_checked_time",
        "progress",
        "current_operation",
        "new_version",
        "new_size"
    ))]
    async fn get_status(&self) -> (i64, f64, String, String, i64) {
        BusStatus::of(&self.shared.snapshot()).tuple()
    }

    #[zbus(signal)]
    async fn status_update(
        emitter: &SignalEmitter<'_>,
        last_checked_time: i64,
        progress: f64,
        current_operation: &str,
        new_version: &str,
        new_size: i64,
    ) -> zbus::Result<()>;
}

/// Which bus to serve on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    /// A bus address (`unix:path=...`): tests, or a bus of the site's own.
    Address(String),
}

impl std::str::FromStr for Bus {
    type Err = String;
    fn from_str(s: &str) -> Result<Bus, String> {
        match s {
            "system" => Ok(Bus::System),
            a if a.contains(':') => Ok(Bus::Address(a.to_string())),
            other => Err(format!(
                "{other:?} is neither `system` nor a D-Bus address such as unix:path=/run/dbus/system_bus_socket"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    #[error("D-Bus ({bus}): {source}")]
    Bus {
        bus: String,
        // Boxed: zbus's error is large and this one is rare.
        #[source]
        source: Box<zbus::Error>,
    },
}

/// Serves the interface while it lives.
pub struct Served {
    _conn: zbus::blocking::Connection,
}

/// Take the name on `bus`, serve the manager, and send `StatusUpdate`
/// whenever the five values change (a thread watching the status board).
pub fn serve(bus: &Bus, shared: Arc<Shared>, engine: Sender<Command>) -> Result<Served, DbusError> {
    let label = match bus {
        Bus::System => "system bus".to_string(),
        Bus::Address(a) => a.clone(),
    };
    let err = |source| DbusError::Bus {
        bus: label.clone(),
        source: Box::new(source),
    };
    let builder = match bus {
        Bus::System => zbus::blocking::connection::Builder::system(),
        Bus::Address(a) => zbus::blocking::connection::Builder::address(a.as_str()),
    }
    .map_err(err)?;
    let conn = builder
        .serve_at(
            OBJECT_PATH,
            Manager {
                shared: shared.clone(),
                engine: Mutex::new(engine),
            },
        )
        .map_err(err)?
        .name(BUS_NAME)
        .map_err(err)?
        .build()
        .map_err(err)?;
    let signals = conn.inner().clone();
    std::thread::Builder::new()
        .name("dbus-signals".into())
        .spawn(move || emit_changes(&signals, &shared))
        .map_err(|e| err(zbus::Error::InputOutput(Arc::new(e))))?;
    tracing::info!("D-Bus: {BUS_NAME} on the {label}");
    Ok(Served { _conn: conn })
}

fn emit_changes(conn: &zbus::Connection, shared: &Shared) {
    let emitter = match SignalEmitter::new(conn, OBJECT_PATH) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("D-Bus: no StatusUpdate signals: {e}");
            return;
        }
    };
    let mut last: Option<BusStatus> = None;
    loop {
        let now = BusStatus::of(&shared.snapshot());
        if last.as_ref() != Some(&now) {
            let t = now.clone();
            if let Err(e) = zbus::block_on(Manager::status_update(
                &emitter,
                t.last_checked_time,
                t.progress,
                &t.current_operation,
                &t.new_version,
                t.new_size,
            )) {
                tracing::warn!("D-Bus: StatusUpdate: {e}");
            }
            last = Some(now);
        }
        let guard = match shared.status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // Woken by each change; the timeout only bounds a missed wake-up.
        let _ = shared.changed.wait_timeout(guard, Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Progress;

    #[test]
    fn every_state_has_flatcars_string() {
        let all = [
            (State::Idle, "UPDATE_STATUS_IDLE"),
            (
                State::CheckingForUpdate,
                "UPDATE_STATUS_CHECKING_FOR_UPDATE",
            ),
            (State::UpdateAvailable, "UPDATE_STATUS_UPDATE_AVAILABLE"),
            (State::Downloading, "UPDATE_STATUS_DOWNLOADING"),
            (State::Verifying, "UPDATE_STATUS_VERIFYING"),
            (State::Finalizing, "UPDATE_STATUS_FINALIZING"),
            (
                State::UpdatedNeedReboot,
                "UPDATE_STATUS_UPDATED_NEED_REBOOT",
            ),
            (
                State::ReportingErrorEvent,
                "UPDATE_STATUS_REPORTING_ERROR_EVENT",
            ),
        ];
        for (s, want) in all {
            assert_eq!(operation(s), want);
            // The socket's name is the same without the prefix.
            assert_eq!(format!("UPDATE_STATUS_{s}"), want);
        }
    }

    #[test]
    fn the_five_values_follow_the_status() {
        let mut st = Status::new();
        let b = BusStatus::of(&st);
        assert_eq!(
            (
                b.last_checked_time,
                b.progress,
                b.new_version.as_str(),
                b.new_size
            ),
            (0, 0.0, "0.0.0", 0)
        );
        st.state = State::Downloading;
        st.new_version = Some("1.1.0".into());
        st.last_check = chrono::DateTime::from_timestamp(1_700_000_000, 0);
        st.progress = Some(Progress {
            done: 25,
            total: 100,
            rate: 0,
            resumed_from: 0,
        });
        let b = BusStatus::of(&st);
        assert_eq!(b.current_operation, "UPDATE_STATUS_DOWNLOADING");
        assert_eq!(b.last_checked_time, 1_700_000_000);
        assert_eq!(b.progress, 0.25);
        assert_eq!(b.new_size, 100);
        assert_eq!(b.new_version, "1.1.0");
        // More done than the total (a server that lied) stays at 1.0.
        st.progress = Some(Progress {
            done: 300,
            total: 100,
            rate: 0,
            resumed_from: 0,
        });
        assert_eq!(BusStatus::of(&st).progress, 1.0);
    }

    #[test]
    fn a_bus_is_system_or_an_address() {
        assert_eq!("system".parse::<Bus>(), Ok(Bus::System));
        assert_eq!(
            "unix:path=/tmp/b".parse::<Bus>(),
            Ok(Bus::Address("unix:path=/tmp/b".into()))
        );
        let e = "session".parse::<Bus>().unwrap_err();
        assert!(e.contains("neither `system` nor a D-Bus address"), "{e}");
    }
}
