//! What each loader reads on the ESP: GRUB's environment block (BIOS)
//! and systemd-boot's entries with boot counting in their names (UEFI).

use super::{Copy, EspError, EspFs, ENTRIES, GRUBENV};
use std::collections::BTreeMap;

/// GRUB's environment block: exactly this size, padded with `#`.
pub const GRUBENV_SIZE: usize = 1024;

pub(super) const GRUBENV_HEADER: &str = "# GRUB Environment Block\n";

/// GRUB's environment block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grubenv {
    pub vars: BTreeMap<String, String>,
}

impl Grubenv {
    pub fn parse(b: &[u8]) -> Result<Grubenv, EspError> {
        let text =
            std::str::from_utf8(b).map_err(|_| EspError::Invalid("grubenv is not UTF-8".into()))?;
        let body = text
            .strip_prefix(GRUBENV_HEADER)
            .ok_or_else(|| EspError::Invalid("grubenv lacks its header".into()))?;
        let mut vars = BTreeMap::new();
        for l in body.lines() {
            if l.starts_with('#') || l.is_empty() {
                continue;
            }
            if let Some((k, v)) = l.split_once('=') {
                vars.insert(k.to_string(), v.to_string());
            }
        }
        Ok(Grubenv { vars })
    }

    /// The 1024-byte block GRUB's `load_env`/`save_env` read and write.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EspError> {
        let mut s = GRUBENV_HEADER.to_string();
        for (k, v) in &self.vars {
            s.push_str(&format!("{k}={v}\n"));
        }
        if s.len() > GRUBENV_SIZE {
            return Err(EspError::Invalid(
                "grubenv variables exceed 1024 bytes".into(),
            ));
        }
        let mut b = s.into_bytes();
        b.resize(GRUBENV_SIZE, b'#');
        Ok(b)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The default copy (a when unset).
    pub fn default_copy(&self) -> Copy {
        self.get("nimbus_s1")
            .and_then(Copy::parse)
            .unwrap_or(Copy::A)
    }

    pub fn trial(&self) -> Option<Copy> {
        self.get("nimbus_s1_try").and_then(Copy::parse)
    }

    pub fn tries(&self) -> u32 {
        self.get("nimbus_s1_tries")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn set(&mut self, default: Copy, trial: Option<Copy>, tries: u32) {
        self.vars.insert("nimbus_s1".into(), default.name().into());
        self.vars.insert(
            "nimbus_s1_try".into(),
            trial.map(|c| c.name().to_string()).unwrap_or_default(),
        );
        self.vars
            .insert("nimbus_s1_tries".into(), tries.to_string());
    }

    /// What GRUB's script boots next, and the environment it leaves (the
    /// try spent) — the same rule as `image/src/bios.rs`'s script.
    pub fn grub_boot(&self) -> (Copy, Grubenv) {
        let mut next = self.clone();
        match self.trial() {
            Some(t) if self.tries() >= 1 => {
                next.vars.insert("nimbus_s1_tries".into(), "0".into());
                (t, next)
            }
            _ => (self.default_copy(), next),
        }
    }
}

/// One systemd-boot entry of ours: `nimbus-<gen>-<copy>[+<left>[-<done>]].conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub file: String,
    pub gen: u64,
    pub copy: Copy,
    /// `None`: no counter (blessed, or never on trial).
    pub tries_left: Option<u32>,
}

impl Entry {
    pub fn parse(file: &str) -> Option<Entry> {
        let stem = file.strip_prefix("nimbus-")?.strip_suffix(".conf")?;
        let (base, counter) = match stem.split_once('+') {
            Some((b, c)) => (b, Some(c)),
            None => (stem, None),
        };
        let (gen, copy) = base.split_once('-')?;
        let tries_left = match counter {
            None => None,
            Some(c) => Some(c.split('-').next()?.parse().ok()?),
        };
        Some(Entry {
            file: file.to_string(),
            gen: gen.parse().ok()?,
            copy: Copy::parse(copy)?,
            tries_left,
        })
    }

    pub fn name(gen: u64, copy: Copy, tries: Option<u32>) -> String {
        match tries {
            Some(t) => format!("nimbus-{gen}-{copy}+{t}.conf"),
            None => format!("nimbus-{gen}-{copy}.conf"),
        }
    }

    pub fn bad(&self) -> bool {
        self.tries_left == Some(0)
    }

    pub fn text(copy: Copy, label: &str, cmdline: &str) -> String {
        format!(
            "title Nimbus stage 1 ({label})\nlinux /{}\ninitrd /{}\noptions {cmdline} nimbus.stage1={copy}\n",
            copy.kernel(),
            copy.initramfs()
        )
    }
}

/// What systemd-boot starts: entries with tries left (or none counted)
/// before those with none, newest generation first; and the entry as it
/// renames it (one try spent).
pub fn sdboot_boot(entries: &[Entry]) -> Option<(Entry, Option<Entry>)> {
    let mut v: Vec<&Entry> = entries.iter().collect();
    v.sort_by_key(|e| (e.bad(), std::cmp::Reverse(e.gen)));
    let e = (*v.first()?).clone();
    let renamed = e.tries_left.map(|t| {
        let left = t.saturating_sub(1);
        Entry {
            file: format!("nimbus-{}-{}+{left}-1.conf", e.gen, e.copy),
            tries_left: Some(left),
            ..e.clone()
        }
    });
    Some((e, renamed))
}

pub fn entries(fs: &dyn EspFs) -> Result<Vec<Entry>, EspError> {
    Ok(fs
        .list(ENTRIES)?
        .iter()
        .filter_map(|f| Entry::parse(f))
        .collect())
}

pub fn grubenv(fs: &dyn EspFs) -> Result<Grubenv, EspError> {
    match fs.read(GRUBENV, GRUBENV_SIZE)? {
        Some(b) => Grubenv::parse(&b),
        None => Ok(Grubenv::default()),
    }
}

/// The copy each loader would start now, for checks (power-cut harness,
/// `xtask qemu --firmware direct`).
pub fn loader_choices(fs: &dyn EspFs) -> Result<(Option<Copy>, Copy), EspError> {
    let sd = sdboot_boot(&entries(fs)?).map(|(e, _)| e.copy);
    let (grub, _) = grubenv(fs)?.grub_boot();
    Ok((sd, grub))
}
