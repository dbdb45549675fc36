//! systemd units as Nimbus enables them (the image builder in /usr,
//! cloud-config in /etc or /run): what `systemctl enable` would link, read
//! from the unit's `[Install]` section.

/// etcd's unit (Debian's etcd 3). No host runs it unless something asks:
/// cloud-config when it configures etcd or a local etcd lock, a unit that
/// wants it, or the operator (docs/cluster.md).
pub const ETCD: &str = "etcd.service";
/// Where etcd's unit file lies in USR (the target of an enabling link).
pub const ETCD_FILE: &str = "/usr/lib/systemd/system/etcd.service";

/// Each `WantedBy=` / `RequiredBy=` target of the unit text's `[Install]`
/// section, with the directory suffix its link goes into (`.wants`,
/// `.requires`), in file order.
pub fn install_targets(content: &str) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let mut in_install = false;
    for line in content.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_install = t == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            let kind = match k.trim() {
                "WantedBy" => ".wants",
                "RequiredBy" => ".requires",
                _ => continue,
            };
            for target in v.split_whitespace() {
                out.push((target.to_string(), kind));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_install_section_counts_and_both_kinds_are_read() {
        let unit = "[Unit]\nWantedBy=ignored.target\n[Install]\nWantedBy=multi-user.target  b.target\nRequiredBy=c.target\nAlias=x\n[Service]\nRequiredBy=no.target\n";
        assert_eq!(
            super::install_targets(unit),
            vec![
                ("multi-user.target".to_string(), ".wants"),
                ("b.target".to_string(), ".wants"),
                ("c.target".to_string(), ".requires"),
            ]
        );
    }
}
