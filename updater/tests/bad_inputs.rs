//! Every bad input an update can meet, each with its own error kind and a
//! non-zero exit, and after each: the booted slot byte-identical and the
//! passive slot not bootable.

mod support;

use std::collections::BTreeSet;

use nimbus::keys::ReleaseKey;
use nimbus::layout::Slot;
use support::httpd::Fault;
use support::Fixture;

struct Case {
    name: &'static str,
    kind: &'static str,
    setup: fn(&Fixture),
}

fn payload_fault(f: &Fixture, fault: Fault) {
    f.httpd.set_fault(Fault {
        suffix: "usr.img.zst".into(),
        ..fault
    });
}

const CASES: &[Case] = &[
    Case {
        name: "payload 404",
        kind: "payload-missing",
        setup: |f| {
            payload_fault(
                f,
                Fault {
                    status: Some(404),
                    ..Fault::default()
                },
            )
        },
    },
    Case {
        name: "manifest 500",
        kind: "http-status",
        setup: |f| {
            f.httpd.set_fault(Fault {
                suffix: "stable.json".into(),
                status: Some(500),
                ..Fault::default()
            })
        },
    },
    Case {
        name: "connection refused",
        kind: "connect",
        setup: |f| {
            // A port that was just free: nothing listens there.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port();
            std::fs::write(
                f.root.join(nimbus::paths::UPDATE_CONF_ETC),
                format!("GROUP=stable\nSERVER=http://127.0.0.1:{port}\nIO_WRITE_BPS=unlimited\n"),
            )
            .expect("conf");
        },
    },
    Case {
        name: "server stalls mid-body",
        kind: "stalled",
        setup: |f| {
            payload_fault(
                f,
                Fault {
                    stall_after: Some(200_000),
                    ..Fault::default()
                },
            )
        },
    },
    Case {
        // The same file on another origin (localhost is not 127.0.0.1 to
        // an origin check): a repository must not send hosts elsewhere.
        name: "manifest redirected to another origin",
        kind: "redirect-refused",
        setup: |f| {
            f.httpd.set_fault(Fault {
                suffix: "stable.json".into(),
                redirect_to: Some(format!(
                    "{}{{path}}",
                    f.httpd.url().replace("127.0.0.1", "localhost")
                )),
                ..Fault::default()
            })
        },
    },
    Case {
        name: "manifest trickles a byte a second",
        kind: "deadline",
        setup: |f| {
            f.httpd.set_fault(Fault {
                suffix: "stable.json".into(),
                trickle_ms: Some(1000),
                ..Fault::default()
            })
        },
    },
    Case {
        name: "payload truncated on the server",
        kind: "payload-truncated",
        setup: |f| {
            let p = f.payload_path();
            let b = std::fs::read(&p).expect("read");
            std::fs::write(&p, &b[..b.len() * 2 / 3]).expect("write");
        },
    },
    Case {
        name: "payload larger than the manifest says",
        kind: "payload-too-large",
        setup: |f| {
            let p = f.payload_path();
            let mut b = std::fs::read(&p).expect("read");
            b.extend_from_slice(&[0u8; 4096]);
            std::fs::write(&p, &b).expect("write");
        },
    },
    Case {
        name: "payload larger than the slot",
        kind: "payload-exceeds-slot",
        setup: |f| f.resign(&f.key, |m| m.releases[0].raw_size = 1 << 40),
    },
    Case {
        name: "compressed hash mismatch",
        kind: "compressed-hash-mismatch",
        setup: |f| {
            f.resign(&f.key, |m| {
                m.releases[0].compressed_sha256 = "ab".repeat(32)
            })
        },
    },
    Case {
        name: "raw hash mismatch",
        kind: "raw-hash-mismatch",
        setup: |f| f.resign(&f.key, |m| m.releases[0].raw_sha256 = "cd".repeat(32)),
    },
    Case {
        name: "malformed manifest",
        kind: "manifest-malformed",
        setup: |f| f.write_signed(&f.key, b"{\"schema\": 1, \"channel\": "),
    },
    Case {
        name: "huge manifest",
        kind: "manifest-too-large",
        setup: |f| {
            let mut b = b"{\"pad\": \"".to_vec();
            b.extend(std::iter::repeat_n(b'x', 2 << 20));
            b.extend_from_slice(b"\"}");
            f.write_signed(&f.key, &b);
        },
    },
    Case {
        name: "manifest altered after signing",
        kind: "bad-signature",
        setup: |f| {
            let p = f.repo.join("channels/stable.json");
            let s = std::fs::read_to_string(&p)
                .expect("read")
                .replace("\"serial\": 1", "\"serial\": 9");
            std::fs::write(&p, s).expect("write");
        },
    },
    Case {
        name: "signature file missing",
        kind: "signature-missing",
        setup: |f| std::fs::remove_file(f.repo.join("channels/stable.json.sig")).expect("rm"),
    },
    Case {
        name: "signed by an untrusted key",
        kind: "untrusted-key",
        setup: |f| {
            let other = ReleaseKey::generate().expect("key");
            f.resign(&other, |_| {});
        },
    },
    Case {
        name: "expired manifest",
        kind: "manifest-expired",
        setup: |f| {
            f.resign(&f.key, |m| {
                m.issued = chrono::Utc::now() - chrono::Duration::days(3);
                m.expires = chrono::Utc::now() - chrono::Duration::days(1);
            })
        },
    },
    Case {
        name: "replayed older manifest",
        kind: "manifest-replayed",
        setup: |f| {
            // This host accepted serial 5 before; the server now shows serial 1.
            let dir = f.root.join("var/lib/nimbus");
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(
                dir.join("update-engine.json"),
                br#"{"last_serial": {"stable": 5}}"#,
            )
            .expect("write");
        },
    },
    Case {
        name: "unknown channel",
        kind: "unknown-channel",
        setup: |f| {
            let url = f.httpd.url();
            std::fs::write(
                f.root.join(nimbus::paths::UPDATE_CONF_ETC),
                format!("GROUP=nosuch\nSERVER={url}\n"),
            )
            .expect("conf");
        },
    },
];

#[test]
fn each_bad_input_fails_with_its_own_error_and_loses_nothing() {
    let mut messages = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    let mut failures = Vec::new();
    // One fixture per case, built in parallel: they are independent.
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = CASES
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let f = Fixture::new(3, 32);
                    let a_before = f.partition_sha(Slot::A);
                    (c.setup)(&f);
                    let (out, st) = f.once(&[]);
                    let a_after = f.partition_sha(Slot::A);
                    let b = f.cgpt(Slot::B);
                    (c, out, st, a_before == a_after, b, f.cgpt(Slot::A))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("case thread"))
            .collect()
    });
    for (c, out, st, a_same, b, a) in results {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let st = st.unwrap_or(serde_json::Value::Null);
        let kind = st["last_error"]["kind"].as_str().unwrap_or("").to_string();
        let msg = st["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut bad = Vec::new();
        if out.status.success() {
            bad.push("exited 0".to_string());
        }
        if kind != c.kind {
            bad.push(format!("kind {kind:?}, expected {:?}", c.kind));
        }
        if st["state"] != "REPORTING_ERROR_EVENT" {
            bad.push(format!("state {}", st["state"]));
        }
        if !a_same {
            bad.push("USR-A changed".into());
        }
        if a != (1, 0, 1) {
            bad.push(format!("USR-A attributes {a:?}"));
        }
        if b.0 != 0 {
            bad.push(format!("USR-B bootable: {b:?}"));
        }
        if !bad.is_empty() {
            failures.push(format!(
                "{}: {}\n  message: {msg}\n  stderr: {stderr}",
                c.name,
                bad.join("; ")
            ));
        }
        eprintln!("{:<40} {kind:<26} {msg}", c.name);
        kinds.insert(kind);
        messages.insert(msg);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        kinds.len(),
        CASES.len(),
        "every case has its own error kind"
    );
    assert_eq!(
        messages.len(),
        CASES.len(),
        "every case has its own message"
    );
}
