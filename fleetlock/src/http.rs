//! The protocol behind HTTP (tiny_http): a few worker threads, each taking
//! one request at a time, its body capped.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::{Answer, Server};

/// Requests served at once; each waits on etcd for at most its deadline.
const WORKERS: usize = 4;

pub struct Handle {
    /// Where it listens (the port chosen when the config said 0).
    pub addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// Serve until the process ends.
    pub fn wait(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }

    /// Stop taking requests and end the workers.
    pub fn stop(self) {
        for _ in 0..self.workers.len() {
            self.http.unblock();
        }
        self.wait();
    }
}

/// Listen where `cfg` says and serve, with etcd from `cfg`.
pub fn start(cfg: &Config) -> Result<Handle, String> {
    let store = nimbus_etcd::LockClient::new(cfg.etcd.clone()).map_err(|e| format!("etcd: {e}"))?;
    let http = tiny_http::Server::http(&cfg.listen)
        .map_err(|e| format!("listening on {}: {e}", cfg.listen))?;
    let addr = http
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("listening on {}: not an IP socket", cfg.listen))?;
    let http = Arc::new(http);
    let server = Arc::new(Server::new(store, cfg.groups.clone()));
    let workers = (0..WORKERS)
        .map(|_| {
            let http = http.clone();
            let server = server.clone();
            std::thread::spawn(move || serve(&http, &server))
        })
        .collect();
    Ok(Handle {
        addr,
        http,
        workers,
    })
}

fn serve<S: crate::Store>(http: &tiny_http::Server, server: &Server<S>) {
    // `recv` ends with an error once `unblock` is called.
    while let Ok(mut req) = http.recv() {
        let header = req.headers().iter().any(|h| {
            h.field.equiv(nimbus::fleetlock::HEADER)
                && h.value.as_str().trim() == nimbus::fleetlock::HEADER_VALUE
        });
        // One byte over the cap is enough to refuse the body.
        let mut body = Vec::new();
        let read = req
            .as_reader()
            .take(nimbus::fleetlock::MAX_BODY as u64 + 1)
            .read_to_end(&mut body);
        let answer = match read {
            Ok(_) => server.handle(&req.method().to_string(), req.url(), header, &body),
            Err(e) => crate::fail(400, "bad_request", format!("reading the body: {e}")),
        };
        let Answer {
            status,
            body,
            content_type,
        } = answer;
        let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
        if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
        {
            resp = resp.with_header(h);
        }
        if let Err(e) = req.respond(resp) {
            tracing::debug!("answering: {e}");
        }
    }
}
