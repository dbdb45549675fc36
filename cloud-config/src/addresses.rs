//! Where this host's addresses for `$public_ipv4` and friends come from
//! (crate::subst), in order, the first that knows a variable winning:
//!
//! 1. `/etc/environment`: `COREOS_PUBLIC_IPV4=` and its siblings, which
//!    Vagrant's CoreOS guest support writes (and a platform's agent may);
//! 2. the OEM partition's `environment` file, the same format, for images
//!    made for one platform;
//! 3. the IPv4 address of the interface of the default route, for both
//!    public and private IPv4 (a host with one network, as under QEMU).
//!
//! The parsers are pure; [`discover`] reads the files and the interfaces.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::subst::Addresses;

/// The environment names, in the order of [`crate::subst::VARS`].
pub const ENV_NAMES: [&str; 4] = [
    "COREOS_PUBLIC_IPV4",
    "COREOS_PRIVATE_IPV4",
    "COREOS_PUBLIC_IPV6",
    "COREOS_PRIVATE_IPV6",
];

/// Where [`discover`] looks; fields so tests can point them at files.
#[derive(Debug, Clone)]
pub struct Places {
    pub env_files: Vec<PathBuf>,
    pub proc_route: PathBuf,
}

impl Default for Places {
    fn default() -> Places {
        Places {
            env_files: vec!["/etc/environment".into(), "/oem/environment".into()],
            proc_route: "/proc/net/route".into(),
        }
    }
}

impl Places {
    /// Where the addresses were looked for, for an error that none was found.
    pub fn describe(&self) -> String {
        let files: Vec<String> = self
            .env_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "looked for {} in {}, then for the default route's interface in {}",
            ENV_NAMES.join("/"),
            files.join(" and "),
            self.proc_route.display()
        )
    }
}

/// `KEY=VALUE` lines (values optionally quoted, `#` comments) of an
/// environment file: the addresses among [`ENV_NAMES`] that parse. A value
/// that is not an address of the right family is ignored with a warning.
pub fn parse_env(text: &str, into: &mut Addresses) {
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
        let (slot, v6) = match k.trim() {
            "COREOS_PUBLIC_IPV4" => (&mut into.public_ipv4, false),
            "COREOS_PRIVATE_IPV4" => (&mut into.private_ipv4, false),
            "COREOS_PUBLIC_IPV6" => (&mut into.public_ipv6, true),
            "COREOS_PRIVATE_IPV6" => (&mut into.private_ipv6, true),
            _ => continue,
        };
        if slot.is_some() {
            continue;
        }
        match v.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => *slot = Some(ip),
            _ => tracing::warn!(
                "{}: {v:?} is not an IPv{} address; ignored",
                k.trim(),
                if v6 { 6 } else { 4 }
            ),
        }
    }
}

/// The interface of the default IPv4 route in `/proc/net/route`'s text
/// (the lowest metric if several).
pub fn default_route_iface(route: &str) -> Option<String> {
    route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let up = u16::from_str_radix(f.get(3)?, 16).ok()? & 1 == 1;
            (up && *f.get(1)? == "00000000" && *f.get(7)? == "00000000")
                .then(|| Some((f.get(6)?.parse::<u32>().ok()?, f[0].to_string())))
                .flatten()
        })
        .min()
        .map(|(_, iface)| iface)
}

/// This host's addresses, from `places` (see the module's order). The
/// environment files are read through `read` (the apply root's confined
/// reader: `--root` may point at a tree whose links lead anywhere); `None`
/// for a file that is not there.
pub fn discover(places: &Places, read: &dyn Fn(&Path) -> Option<String>) -> Addresses {
    let mut a = Addresses::default();
    for f in &places.env_files {
        if let Some(text) = read(f) {
            parse_env(&text, &mut a);
        }
    }
    if a.public_ipv4.is_none() || a.private_ipv4.is_none() {
        if let Some(ip) = default_route_ipv4(&places.proc_route) {
            a.public_ipv4.get_or_insert(ip);
            a.private_ipv4.get_or_insert(ip);
        }
    }
    a
}

fn default_route_ipv4(proc_route: &Path) -> Option<IpAddr> {
    let iface = default_route_iface(&std::fs::read_to_string(proc_route).ok()?)?;
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for ifa in addrs {
        if ifa.interface_name != iface {
            continue;
        }
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            return Some(IpAddr::V4(sin.ip()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_files_give_the_platform_addresses() {
        let mut a = Addresses::default();
        parse_env(
            "# written by vagrant\nCOREOS_PUBLIC_IPV4=172.17.8.101\nexport COREOS_PRIVATE_IPV4=\"10.0.2.15\"\nCOREOS_PUBLIC_IPV6=10.0.0.1\nPATH=/usr/bin\n",
            &mut a,
        );
        assert_eq!(a.public_ipv4, Some("172.17.8.101".parse().unwrap()));
        assert_eq!(a.private_ipv4, Some("10.0.2.15".parse().unwrap()));
        // An IPv4 address where an IPv6 one belongs is no address.
        assert_eq!(a.public_ipv6, None);
        // The first file that knows a variable wins.
        parse_env("COREOS_PUBLIC_IPV4=1.2.3.4\n", &mut a);
        assert_eq!(a.public_ipv4, Some("172.17.8.101".parse().unwrap()));
    }

    #[test]
    fn the_default_route_is_the_lowest_metric_up_route_to_anywhere() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth1\t00000000\t010200C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth2\t00000000\t010200C0\t0002\t0\t0\t1\t00000000\t0\t0\t0\n\
            eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_iface(route).as_deref(), Some("eth0"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
    }

    #[test]
    fn discover_reads_files_in_order_then_the_route() {
        let d = tempfile::tempdir().unwrap();
        let (e1, e2) = (d.path().join("env1"), d.path().join("env2"));
        std::fs::write(&e1, "COREOS_PUBLIC_IPV4=172.17.8.101\n").unwrap();
        std::fs::write(
            &e2,
            "COREOS_PUBLIC_IPV4=9.9.9.9\nCOREOS_PRIVATE_IPV6=fd00::5\n",
        )
        .unwrap();
        let p = Places {
            env_files: vec![e1, e2, d.path().join("missing")],
            // No default route: private IPv4 stays unknown.
            proc_route: d.path().join("route"),
        };
        let a = discover(&p, &|f| std::fs::read_to_string(f).ok());
        assert_eq!(a.public_ipv4, Some("172.17.8.101".parse().unwrap()));
        assert_eq!(a.private_ipv4, None);
        assert_eq!(a.private_ipv6, Some("fd00::5".parse().unwrap()));
        assert!(p
            .describe()
            .contains("COREOS_PUBLIC_IPV4/COREOS_PRIVATE_IPV4"));
    }
}
