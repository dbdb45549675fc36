//! The `#cloud-config` examples in the documentation validate: a reader who
//! copies one gets a document `cloud-config validate` accepts (and the
//! cluster example is the secured one: docs/cluster.md, "Securing etcd").

use nimbus_cloud_config::schema::{check, Severity, UserData};

/// Every fenced block of `text` that starts with `#cloud-config`.
fn examples(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for l in text.lines() {
        match &mut cur {
            None if l.starts_with("```") => cur = Some(String::new()),
            None => {}
            Some(b) if l.starts_with("```") => {
                if b.starts_with("#cloud-config") {
                    out.push(std::mem::take(b));
                }
                cur = None;
            }
            Some(b) => {
                b.push_str(l);
                b.push('\n');
            }
        }
    }
    out
}

#[test]
fn every_cloud_config_example_in_the_docs_validates() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut n = 0;
    for e in std::fs::read_dir(&docs).expect("docs/") {
        let p = e.expect("entry").path();
        if p.extension().is_none_or(|x| x != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("read");
        for ex in examples(&text) {
            n += 1;
            let (data, problems) = check(&ex);
            let errors: Vec<_> = problems
                .iter()
                .filter(|p| p.severity == Severity::Error)
                .collect();
            assert!(
                errors.is_empty() && matches!(data, Some(UserData::CloudConfig(_))),
                "{}: an example does not validate: {errors:#?}\n{ex}",
                p.display()
            );
            if p.ends_with("cluster.md") {
                assert!(
                    !problems
                        .iter()
                        .any(|p| p.message.contains("etcd_insecure_plaintext")),
                    "the cluster example must be the secured one: {problems:#?}"
                );
            }
        }
    }
    assert!(
        n >= 1,
        "no #cloud-config example found under {}",
        docs.display()
    );
}
