//! Users: passwd, group and shadow merged line by line, and their SSH
//! keys (`authorized_keys.d`, merged into `authorized_keys`).

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Db {
    path: &'static str,
    lines: Vec<Vec<String>>,
    fields: usize,
}

impl Db {
    pub(super) fn load(root: &Root, path: &'static str, fields: usize) -> Db {
        let lines = root
            .read(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect();
        Db {
            path,
            lines,
            fields,
        }
    }
    pub(super) fn find(&self, name: &str) -> Option<&Vec<String>> {
        self.lines
            .iter()
            .find(|l| l.first().map(String::as_str) == Some(name))
    }
    pub(super) fn find_mut(&mut self, name: &str) -> Option<&mut Vec<String>> {
        self.lines
            .iter_mut()
            .find(|l| l.first().map(String::as_str) == Some(name))
    }
    pub(super) fn ids(&self) -> Vec<u32> {
        self.lines
            .iter()
            .filter_map(|l| l.get(2)?.parse().ok())
            .collect()
    }
    pub(super) fn render(&self) -> String {
        self.lines
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.resize(self.fields.max(l.len()), String::new());
                l.join(":") + "\n"
            })
            .collect()
    }
    pub(super) fn save(&self, root: &mut Root, mode: u32) -> Result<(), ApplyError> {
        root.write(self.path, self.render().as_bytes(), mode, Some((0, 0)))
    }
}

pub(super) struct Accounts {
    pub(super) passwd: Db,
    pub(super) group: Db,
    pub(super) shadow: Db,
}

impl Accounts {
    pub(super) fn load(root: &Root) -> Accounts {
        Accounts {
            passwd: Db::load(root, "/etc/passwd", 7),
            group: Db::load(root, "/etc/group", 4),
            shadow: Db::load(root, "/etc/shadow", 9),
        }
    }

    pub(super) fn uid(&self, name: &str) -> Option<u32> {
        if let Ok(n) = name.parse() {
            return Some(n);
        }
        self.passwd.find(name)?.get(2)?.parse().ok()
    }

    pub(super) fn gid(&self, name: &str) -> Option<u32> {
        if let Ok(n) = name.parse() {
            return Some(n);
        }
        self.group.find(name)?.get(2)?.parse().ok()
    }

    pub(super) fn free_id(used: &[u32], system: bool) -> u32 {
        let range = if system { 100..1000 } else { 1000..60000 };
        range
            .clone()
            .find(|i| !used.contains(i))
            .unwrap_or(range.end)
    }

    pub(super) fn add_member(&mut self, group: &str, user: &str) -> Result<(), String> {
        let g = self
            .group
            .find_mut(group)
            .ok_or_else(|| format!("group {group:?} does not exist"))?;
        g.resize(4, String::new());
        let mut members: Vec<String> = g[3]
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        if !members.iter().any(|m| m == user) {
            members.push(user.to_string());
            g[3] = members.join(",");
        }
        Ok(())
    }

    /// Create or update a user; returns (uid, gid, home).
    pub(super) fn ensure(&mut self, u: &User, today: u64) -> Result<(u32, u32, String), String> {
        if let Some(existing) = self.passwd.find(&u.name).cloned() {
            if let Some(hash) = &u.passwd {
                if let Some(s) = self.shadow.find_mut(&u.name) {
                    s.resize(9, String::new());
                    s[1] = hash.clone();
                }
            }
            for g in &u.groups {
                self.add_member(g, &u.name)?;
            }
            let uid = existing.get(2).and_then(|x| x.parse().ok()).unwrap_or(0);
            let gid = existing.get(3).and_then(|x| x.parse().ok()).unwrap_or(0);
            return Ok((uid, gid, existing.get(5).cloned().unwrap_or_default()));
        }
        let uid = Self::free_id(&self.passwd.ids(), u.system);
        let gid = match (&u.primary_group, u.no_user_group) {
            (Some(g), _) => self
                .gid(g)
                .ok_or_else(|| format!("primary_group {g:?} does not exist"))?,
            (None, true) => self.gid("users").unwrap_or(100),
            (None, false) => {
                if self.group.find(&u.name).is_some() {
                    return Err(format!(
                        "a group named {:?} already exists; set primary_group or no_user_group",
                        u.name
                    ));
                }
                let gid = if self.group.ids().contains(&uid) {
                    Self::free_id(&self.group.ids(), u.system)
                } else {
                    uid
                };
                self.group.lines.push(vec![
                    u.name.clone(),
                    "x".into(),
                    gid.to_string(),
                    String::new(),
                ]);
                gid
            }
        };
        let home = u
            .homedir
            .clone()
            .unwrap_or_else(|| format!("/home/{}", u.name));
        let shell = u.shell.clone().unwrap_or_else(|| "/bin/bash".into());
        self.passwd.lines.push(vec![
            u.name.clone(),
            "x".into(),
            uid.to_string(),
            gid.to_string(),
            u.gecos.clone().unwrap_or_default(),
            home.clone(),
            shell,
        ]);
        self.shadow.lines.push(vec![
            u.name.clone(),
            u.passwd.clone().unwrap_or_else(|| "*".into()),
            today.to_string(),
            "0".into(),
            "99999".into(),
            "7".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        for g in &u.groups {
            self.add_member(g, &u.name)?;
        }
        Ok((uid, gid, home))
    }

    pub(super) fn save(&self, root: &mut Root) -> Result<(), ApplyError> {
        self.passwd.save(root, 0o644)?;
        self.group.save(root, 0o644)?;
        self.shadow.save(root, 0o640)
    }
}

pub(super) fn days_since_epoch() -> u64 {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    secs / 86400
}

pub(super) fn key_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// What `authorized_keys` becomes, from the files in `authorized_keys.d`
/// (name, text) and the user's own edits since cloud-config last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMerge {
    pub authorized_keys: String,
    /// Keys added to `authorized_keys` by hand (or by Vagrant, ssh-copy-id):
    /// kept, in `authorized_keys.d/local`.
    pub added: Vec<String>,
    /// Keys removed from `authorized_keys` by hand: never put back.
    pub removed: Vec<String>,
}

/// The user's edits win: a key added to `authorized_keys` by hand stays,
/// a key removed by hand stays removed (until it is added by hand again).
/// This is how Vagrant's insecure key, given by the OEM user-data on every
/// boot, is gone for good once Vagrant replaced it with its own.
/// `last` is what cloud-config wrote last time (`.generated`); without it,
/// every key in an existing file counts as the user's.
pub fn merge_keys(
    sources: &[(String, String)],
    current: Option<&str>,
    last: Option<&str>,
    removed_before: &str,
) -> KeyMerge {
    use std::collections::BTreeSet;
    let cur: Vec<&str> = current.map(|c| key_lines(c).collect()).unwrap_or_default();
    let gen: BTreeSet<&str> = last.map(|l| key_lines(l).collect()).unwrap_or_default();
    let added: Vec<String> = cur
        .iter()
        .filter(|k| !gen.contains(*k))
        .map(|k| k.to_string())
        .collect();
    let mut removed: Vec<String> = key_lines(removed_before)
        .filter(|k| !added.iter().any(|a| a == k))
        .map(str::to_string)
        .collect();
    if current.is_some() {
        for k in &gen {
            if !cur.contains(k) && !removed.iter().any(|r| r == k) {
                removed.push(k.to_string());
            }
        }
    }
    let mut seen: BTreeSet<String> = removed.iter().cloned().collect();
    let mut out = String::new();
    let local_text;
    let mut all: Vec<(&str, &str)> = sources
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    if !added.is_empty() {
        let existing = all.iter().position(|(n, _)| *n == "local");
        let mut t = existing.map(|i| all[i].1.to_string()).unwrap_or_default();
        for k in &added {
            t.push_str(k);
            t.push('\n');
        }
        local_text = t;
        match existing {
            Some(i) => all[i].1 = &local_text,
            None => {
                all.push(("local", &local_text));
                all.sort();
            }
        }
    }
    for (name, text) in all {
        out.push_str(&format!("# {name}\n"));
        for k in key_lines(text) {
            if seen.insert(k.to_string()) {
                out.push_str(k);
                out.push('\n');
            }
        }
    }
    KeyMerge {
        authorized_keys: out,
        added,
        removed,
    }
}

/// Flatcar's layout: each source of keys gets a file in authorized_keys.d,
/// and authorized_keys is their concatenation, with the user's own edits
/// kept (see [`merge_keys`]).
pub(super) fn write_ssh_keys(
    root: &mut Root,
    home: &str,
    owner: (u32, u32),
    keys: &[String],
) -> Result<(), ApplyError> {
    root.mkdir_owned(&format!("{home}/.ssh"), 0o700, owner)?;
    let d = format!("{home}/.ssh/authorized_keys.d");
    root.mkdir_owned(&d, 0o700, owner)?;
    let mut body = keys.join("\n");
    body.push('\n');
    root.write(
        &format!("{d}/cloud-config"),
        body.as_bytes(),
        0o600,
        Some(owner),
    )?;
    // Regular files only: a symlink the user put there is skipped, never
    // read through (it could name a root-only file).
    let sources = root.read_dir_files(&d)?;
    let ak = format!("{home}/.ssh/authorized_keys");
    let current = root.read(&ak);
    let last = root.read(&format!("{d}/.generated"));
    let removed_before = root.read(&format!("{d}/.removed")).unwrap_or_default();
    let m = merge_keys(
        &sources,
        current.as_deref(),
        last.as_deref(),
        &removed_before,
    );
    if !m.added.is_empty() {
        let mut local = sources
            .iter()
            .find(|(n, _)| n == "local")
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        for k in &m.added {
            local.push_str(k);
            local.push('\n');
        }
        root.write(&format!("{d}/local"), local.as_bytes(), 0o600, Some(owner))?;
    }
    let mut removed = m.removed.join("\n");
    if !removed.is_empty() {
        removed.push('\n');
    }
    if removed != removed_before {
        root.write(
            &format!("{d}/.removed"),
            removed.as_bytes(),
            0o600,
            Some(owner),
        )?;
    }
    // authorized_keys before the record of it: a cut between the two makes
    // the next run see cloud-config's own keys as hand-added (kept), never
    // as hand-removed (lost).
    root.write(&ak, m.authorized_keys.as_bytes(), 0o600, Some(owner))?;
    root.write(
        &format!("{d}/.generated"),
        m.authorized_keys.as_bytes(),
        0o600,
        Some(owner),
    )
}

pub(super) fn apply_users(root: &mut Root, cfg: &CloudConfig) -> Result<(), ApplyError> {
    if cfg.users.is_empty() && cfg.ssh_authorized_keys.is_empty() {
        return Ok(());
    }
    let mut acc = Accounts::load(root);
    let today = days_since_epoch();
    let mut homes: Vec<(User, (u32, u32, String))> = Vec::new();
    let mut users = cfg.users.clone();
    if !cfg.ssh_authorized_keys.is_empty() {
        // The top-level keys are the `core` user's, as on CoreOS.
        let mut core = users
            .iter()
            .find(|u| u.name == "core")
            .cloned()
            .unwrap_or_else(|| User {
                name: "core".into(),
                groups: ["sudo", "docker", "systemd-journal"]
                    .iter()
                    .filter(|g| acc.group.find(g).is_some())
                    .map(|g| g.to_string())
                    .collect(),
                ..User::default()
            });
        core.ssh_authorized_keys
            .extend(cfg.ssh_authorized_keys.iter().cloned());
        users.retain(|u| u.name != "core");
        users.push(core);
    }
    for u in &users {
        match acc.ensure(u, today) {
            Ok(ids) => homes.push((u.clone(), ids)),
            Err(e) => root.report.errors.push(format!("user {}: {e}", u.name)),
        }
    }
    acc.save(root)?;
    for (u, (uid, gid, home)) in homes {
        if !u.no_create_home && !u.system {
            root.mkdir_owned(&home, 0o700, (uid, gid))?;
        }
        if !u.ssh_authorized_keys.is_empty() {
            write_ssh_keys(root, &home, (uid, gid), &u.ssh_authorized_keys)?;
        }
    }
    Ok(())
}
