//! `$public_ipv4`, `$private_ipv4`, `$public_ipv6` and `$private_ipv6` in
//! user-data, replaced by this host's addresses before it is parsed, as
//! coreos-cloudinit did (`\$public_ipv4` stays literal). Pure text work:
//! where the addresses come from is [`crate::addresses`].

use std::net::IpAddr;

/// The variables, in the order [`Addresses::get`] takes them.
pub const VARS: [&str; 4] = [
    "$public_ipv4",
    "$private_ipv4",
    "$public_ipv6",
    "$private_ipv6",
];

/// This host's addresses as the platform reports them; `None`: not known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    pub public_ipv4: Option<IpAddr>,
    pub private_ipv4: Option<IpAddr>,
    pub public_ipv6: Option<IpAddr>,
    pub private_ipv6: Option<IpAddr>,
}

impl Addresses {
    /// Documentation addresses (RFC 5737, RFC 3849) that `validate`
    /// substitutes, so the URL and cluster checks see the shape the host
    /// will: every variable known, public and private the same.
    pub fn placeholders() -> Addresses {
        let v4 = IpAddr::from([192, 0, 2, 1]);
        let v6 = IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
        Addresses {
            public_ipv4: Some(v4),
            private_ipv4: Some(v4),
            public_ipv6: Some(v6),
            private_ipv6: Some(v6),
        }
    }

    fn get(&self, var: &str) -> Option<IpAddr> {
        match var {
            "$public_ipv4" => self.public_ipv4,
            "$private_ipv4" => self.private_ipv4,
            "$public_ipv6" => self.public_ipv6,
            "$private_ipv6" => self.private_ipv6,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {var} is used but this host's address is not known ({why})")]
pub struct Unknown {
    pub line: usize,
    pub var: &'static str,
    /// Where it was looked for.
    pub why: String,
}

/// Whether `text` uses any of the variables (unescaped).
pub fn uses_any(text: &str) -> bool {
    let mut found = false;
    scan(text, |_, m| found |= matches!(m, Match::Var(_)));
    found
}

/// `text` with every variable replaced; the first one whose address is not
/// known is an error naming it and its line (nothing is half replaced).
/// `why` says where addresses were looked for, for that error.
pub fn substitute(text: &str, a: &Addresses, why: &str) -> Result<String, Unknown> {
    let mut out = String::with_capacity(text.len());
    let mut missing = None;
    let mut last = 0;
    scan(text, |at, m| {
        out.push_str(&text[last..at]);
        match m {
            Match::Escaped(var) => {
                out.push_str(var);
                last = at + 1 + var.len();
            }
            Match::Var(var) => {
                match a.get(var) {
                    Some(ip) => out.push_str(&ip.to_string()),
                    None => {
                        if missing.is_none() {
                            let line = text[..at].matches('\n').count() + 1;
                            missing = Some(Unknown {
                                line,
                                var,
                                why: why.to_string(),
                            });
                        }
                    }
                }
                last = at + var.len();
            }
        }
    });
    if let Some(e) = missing {
        return Err(e);
    }
    out.push_str(&text[last..]);
    Ok(out)
}

enum Match {
    /// `\$var`: the variable's name, kept literally.
    Escaped(&'static str),
    Var(&'static str),
}

/// Call `f(byte offset, match)` for each variable in `text`, in order. A
/// name continued by a word character (`$public_ipv4x`) is not a variable.
fn scan(text: &str, mut f: impl FnMut(usize, Match)) {
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find('$') {
        let at = i + off;
        let var = VARS.iter().find(|v| {
            text[at..].starts_with(**v)
                && !b
                    .get(at + v.len())
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        });
        match var {
            Some(v) if at > 0 && b[at - 1] == b'\\' => {
                f(at - 1, Match::Escaped(v));
                i = at + v.len();
            }
            Some(v) => {
                f(at, Match::Var(v));
                i = at + v.len();
            }
            None => i = at + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Addresses {
        Addresses {
            public_ipv4: Some("172.17.8.101".parse().unwrap()),
            private_ipv4: Some("10.0.2.15".parse().unwrap()),
            public_ipv6: None,
            private_ipv6: None,
        }
    }

    #[test]
    fn variables_are_replaced_and_escapes_kept() {
        let t = "a: http://$public_ipv4:2379\nb: $private_ipv4\nc: \\$public_ipv4 $public_ipv4x $other\n";
        assert_eq!(
            substitute(t, &addrs(), "").unwrap(),
            "a: http://172.17.8.101:2379\nb: 10.0.2.15\nc: $public_ipv4 $public_ipv4x $other\n"
        );
        assert!(uses_any(t));
        assert!(!uses_any("x: \\$public_ipv4 $public_ipv4_y\n"));
        assert_eq!(
            substitute("no vars\n", &Addresses::default(), "").unwrap(),
            "no vars\n"
        );
    }

    #[test]
    fn an_unknown_address_names_the_variable_and_its_line() {
        let t = "#cloud-config\nx: $public_ipv4\ny: $public_ipv6\nz: $public_ipv6\n";
        let e = substitute(t, &addrs(), "not in /etc/environment").unwrap_err();
        assert_eq!((e.line, e.var), (3, "$public_ipv6"));
        assert_eq!(
            e.to_string(),
            "line 3: $public_ipv6 is used but this host's address is not known (not in /etc/environment)"
        );
    }

    #[test]
    fn placeholders_fill_every_variable() {
        let t = VARS.join(" ");
        assert_eq!(
            substitute(&t, &Addresses::placeholders(), "").unwrap(),
            "192.0.2.1 192.0.2.1 2001:db8::1 2001:db8::1"
        );
    }
}
