//! `cargo xtask cluster-config --hosts h1=ADDR,h2=ADDR,... --out DIR`:
//! what an operator needs to bring up an etcd cluster whose members and
//! clients prove who they are. A CA, a certificate per host (server and
//! client, for etcd's client and peer ports alike), an operator's client
//! certificate, and one complete `#cloud-config` per host that installs
//! them and points etcd, update-engine, nimbus-swarm and etcdctl at them.
//!
//! The keys are made here with rcgen (ECDSA P-256 over ring, the provider
//! reqwest's rustls already builds): no `openssl` or `cfssl` shell-out, no
//! key on a command line. Every private key and every user-data file (it
//! carries the host's key) is written 0600, new (O_EXCL) under a fresh
//! directory: the command refuses an `--out` that already holds material
//! rather than mixing two CAs.
//!
//! The cluster harness (`vm/cluster`) builds its hosts' user-data with
//! [`user_data`] and its probes' client identity from [`Pki::admin`]; the
//! example in docs/cluster.md is this command's output.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the material sits on a host (written by the user-data).
pub const HOST_CA: &str = "/etc/nimbus/etcd/ca.pem";
pub const HOST_CERT: &str = "/etc/nimbus/etcd/host.pem";
pub const HOST_KEY: &str = "/etc/nimbus/etcd/host-key.pem";

/// Client port and peer port, etcd's own.
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// Docker swarm's manager port.
pub const SWARM_PORT: u16 = 2377;

#[derive(clap::Args)]
pub struct ClusterConfigArgs {
    /// The members, NAME=ADDRESS each, comma-separated: `h1=10.0.0.11,h2=10.0.0.12,h3=10.0.0.13`.
    /// The first starts the swarm; every one is an etcd member and a swarm manager.
    #[arg(long, value_name = "NAME=ADDR,...")]
    pub hosts: String,
    /// A new or empty directory for the material.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// An SSH public key (the key itself, or a file holding it) for root.
    #[arg(long, value_name = "KEY|FILE")]
    pub ssh_key: Option<String>,
    /// The update server (coreos.update.server); the image's own when not given.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// The release channel.
    #[arg(long, default_value = "stable")]
    pub group: String,
    /// Reboot through this FleetLock server (nimbus-fleetlock or airlock)
    /// instead of locksmith's semaphore in the cluster's etcd.
    #[arg(long, value_name = "URL")]
    pub fleetlock_url: Option<String>,
    /// One user-data for every member (`user-data` in --out), as Vagrant
    /// and autoscaling groups hand out: the members share one certificate
    /// (valid for all their names and addresses), each takes its address
    /// from `$private_ipv4` and its etcd name from its host name, and the
    /// first manager up starts the swarm (`init: auto`).
    #[arg(long)]
    pub shared: bool,
    /// Form etcd through etcd's discovery protocol at URL (a discovery
    /// service the operator runs: `http://HOST:PORT/v2/keys/discovery/TOKEN`,
    /// its `_config/size` set) instead of a static initial cluster.
    #[arg(long, value_name = "URL", requires = "shared")]
    pub discovery: Option<String>,
    /// The certificates' lifetime in days.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
}

/// One member: a hostname and the address the others reach it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub addr: IpAddr,
}

/// `h1=10.0.0.11,h2=10.0.0.12`: names a hostname may carry, unique names
/// and addresses, addresses another host can reach.
pub fn parse_hosts(s: &str) -> Result<Vec<Member>, String> {
    let mut out: Vec<Member> = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        let (name, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("--hosts: {part:?} is not NAME=ADDRESS"))?;
        let ok_name = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !ok_name {
            return Err(format!(
                "--hosts: {name:?} is not a host name (a-z, 0-9 and '-', at most 63, no '-' at either end)"
            ));
        }
        let addr: IpAddr = addr
            .parse()
            .map_err(|e| format!("--hosts: {name}: {addr:?} is not an IP address: {e}"))?;
        if addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
            return Err(format!(
                "--hosts: {name}: {addr} cannot be reached from another host"
            ));
        }
        if out.iter().any(|m| m.name == name) {
            return Err(format!("--hosts: {name} is given twice"));
        }
        if let Some(m) = out.iter().find(|m| m.addr == addr) {
            return Err(format!("--hosts: {name} and {} share {addr}", m.name));
        }
        out.push(Member {
            name: name.to_string(),
            addr,
        });
    }
    if out.is_empty() {
        return Err("--hosts: no member given".into());
    }
    Ok(out)
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pair {
    // Never print a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").finish_non_exhaustive()
    }
}

/// The cluster's CA, the operator's client pair and one pair per member
/// (in `members` order).
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: Pair,
    pub admin: Pair,
    pub hosts: Vec<Pair>,
    /// The cluster secret the swarm's worker token is sealed with in etcd.
    pub swarm_secret: nimbus::swarmconf::Secret,
}

fn ymd(d: chrono::NaiveDate) -> anyhow::Result<(i32, u8, u8)> {
    use chrono::Datelike;
    Ok((d.year(), u8::try_from(d.month())?, u8::try_from(d.day())?))
}

fn validity(p: &mut rcgen::CertificateParams, days: u32) -> anyhow::Result<()> {
    // From well before today: a host whose clock is behind at first boot
    // (no RTC battery, no NTP yet) must still accept its peers.
    let today = chrono::Utc::now().date_naive();
    let from = today
        .checked_sub_days(chrono::Days::new(2))
        .context("the certificates' start date")?;
    let to = today
        .checked_add_days(chrono::Days::new(u64::from(days)))
        .context("--days: past the calendar's end")?;
    let (y, m, d) = ymd(from)?;
    p.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd(to)?;
    p.not_after = rcgen::date_time_ymd(y, m, d);
    Ok(())
}

/// `shared`: one pair for all members, valid for every name and address.
pub fn make_pki(members: &[Member], days: u32, shared: bool) -> anyhow::Result<Pki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "Nimbus cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, days)?;
    let ca = p.self_signed(&ca_key).context("signing the CA")?;
    let leaf = |cn: &str, sans: Vec<SanType>, server: bool| -> anyhow::Result<Pair> {
        let key = KeyPair::generate().with_context(|| format!("generating {cn}'s key"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, days)?;
        let cert = p
            .signed_by(&key, &ca, &ca_key)
            .with_context(|| format!("signing {cn}'s certificate"))?;
        Ok(Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    };
    let dns = |s: &str| -> anyhow::Result<SanType> {
        Ok(SanType::DnsName(
            s.try_into()
                .with_context(|| format!("{s:?} as a DNS name"))?,
        ))
    };
    // Its name and address for the others; loopback for its own clients
    // (update-engine, nimbus-swarm, etcdctl on the host).
    let sans = |ms: &[Member]| -> anyhow::Result<Vec<SanType>> {
        let mut v = Vec::new();
        for m in ms {
            v.push(dns(&m.name)?);
        }
        v.push(dns("localhost")?);
        v.extend(ms.iter().map(|m| SanType::IpAddress(m.addr)));
        v.push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
        Ok(v)
    };
    let mut hosts = Vec::new();
    if shared {
        hosts.push(leaf("nimbus-member", sans(members)?, true)?);
    } else {
        for m in members {
            hosts.push(leaf(&m.name, sans(std::slice::from_ref(m))?, true)?);
        }
    }
    let admin = leaf("nimbus-admin", Vec::new(), false)?;
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret)
        .map_err(|e| anyhow::anyhow!("randomness for the cluster secret: {e}"))?;
    Ok(Pki {
        ca: Pair {
            cert: ca.pem(),
            key: ca_key.serialize_pem(),
        },
        admin,
        hosts,
        swarm_secret: nimbus::swarmconf::Secret(secret),
    })
}

/// What a site adds to every host's user-data.
#[derive(Debug, Clone, Default)]
pub struct Site {
    pub ssh_keys: Vec<String>,
    pub server: Option<String>,
    pub group: String,
    /// Extra `write_files` items, YAML, indented as items of that list.
    pub write_files: String,
    /// Extra `coreos.units` items, indented as items of that list.
    pub units: String,
    /// Extra keys under `nimbus:`, indented as such.
    pub nimbus: String,
    /// Reboot through this FleetLock server (REBOOT_STRATEGY=fleetlock)
    /// rather than locksmith's semaphore in the cluster's etcd.
    pub fleetlock_url: Option<String>,
}

/// A YAML single-quoted scalar (no escapes but the quote doubled).
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A literal block's lines, indented by `n` spaces.
fn block(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn url_host(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v) => v.to_string(),
        IpAddr::V6(v) => format!("[{v}]"),
    }
}

/// Member `i`'s complete user-data: its certificate and key (0600), the CA,
/// etcd on https with client-certificate auth for clients and peers,
/// update-engine's etcd-lock and nimbus-swarm over the same certificate,
/// etcdctl's environment for root's login shells, and its swarm place.
pub fn user_data(members: &[Member], i: usize, pki: &Pki, site: &Site) -> anyhow::Result<String> {
    user_data_for(members, Some(i), pki, site, None)
}

/// The one user-data of `--shared` (every member), etcd formed by
/// `discovery` when given, else by the static member list.
pub fn shared_user_data(
    members: &[Member],
    pki: &Pki,
    site: &Site,
    discovery: Option<&str>,
) -> anyhow::Result<String> {
    user_data_for(members, None, pki, site, discovery)
}

fn user_data_for(
    members: &[Member],
    who: Option<usize>,
    pki: &Pki,
    site: &Site,
    discovery: Option<&str>,
) -> anyhow::Result<String> {
    let me = match who {
        Some(i) => Some(members.get(i).context("no such member")?),
        None => None,
    };
    let pair = pki
        .hosts
        .get(who.unwrap_or(0))
        .context("no certificate for the member")?;
    // A shared document names no host: cloud-config fills in the address
    // on each (`$private_ipv4`), etcd names the member after the host.
    let a = me.map_or_else(|| "$private_ipv4".to_string(), |m| url_host(m.addr));
    let cluster: Vec<String> = members
        .iter()
        .map(|m| format!("{}=https://{}:{PEER_PORT}", m.name, url_host(m.addr)))
        .collect();
    let endpoints: Vec<String> = members
        .iter()
        .map(|m| format!("https://{}:{CLIENT_PORT}", url_host(m.addr)))
        .collect();
    let mut y = String::from("#cloud-config\n");
    match me {
        Some(me) => {
            let _ = writeln!(
                y,
                "# {}: made by `cargo xtask cluster-config`; it holds this host's private key.",
                me.name
            );
            let _ = writeln!(y, "hostname: {}", me.name);
        }
        None => {
            let _ = writeln!(
                y,
                "# Every member of {}: made by `cargo xtask cluster-config --shared`; it holds\n# the members' shared private key.",
                members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    if !site.ssh_keys.is_empty() {
        y.push_str("users:\n  - name: root\n    ssh_authorized_keys:\n");
        for k in &site.ssh_keys {
            let _ = writeln!(y, "      - {}", quoted(k.trim()));
        }
    }
    y.push_str("write_files:\n");
    for (path, text, owner, mode) in [
        (HOST_CA, &pki.ca.cert, "root:root", "0644"),
        (HOST_CERT, &pair.cert, "root:root", "0644"),
        // etcd runs as its own user and reads its key; root reads it too.
        (HOST_KEY, &pair.key, "etcd:etcd", "0600"),
    ] {
        let _ = write!(
            y,
            "  - path: {path}\n    owner: {owner}\n    permissions: '{mode}'\n    content: |\n{}",
            block(text, 6)
        );
    }
    // etcdctl reads only its environment; root's login shells get it, and
    // nobody else can read the key it names.
    let _ = write!(
        y,
        "  - path: /etc/profile.d/nimbus-etcdctl.sh\n    permissions: '0644'\n    content: |\n{}",
        block(
            &format!(
                "export ETCDCTL_ENDPOINTS=https://127.0.0.1:{CLIENT_PORT}\nexport ETCDCTL_CACERT={HOST_CA}\nexport ETCDCTL_CERT={HOST_CERT}\nexport ETCDCTL_KEY={HOST_KEY}"
            ),
            6
        )
    );
    y.push_str(&site.write_files);
    y.push_str("coreos:\n  etcd2:\n");
    let mut etcd2: Vec<(&str, String)> = Vec::new();
    if let Some(me) = me {
        etcd2.push(("name", me.name.clone()));
    }
    match discovery {
        Some(url) => etcd2.push(("discovery", url.to_string())),
        None => etcd2.extend([
            ("initial-cluster", cluster.join(",")),
            ("initial-cluster-state", "new".into()),
            ("initial-cluster-token", "nimbus-cluster".into()),
        ]),
    }
    etcd2.extend([
        (
            "initial-advertise-peer-urls",
            format!("https://{a}:{PEER_PORT}"),
        ),
        ("listen-peer-urls", format!("https://{a}:{PEER_PORT}")),
        // Every interface: its own clients on loopback, the others on the
        // cluster's address, an operator's tunnel on whatever it arrives
        // at; each must show a certificate the CA signed.
        (
            "listen-client-urls",
            format!("https://0.0.0.0:{CLIENT_PORT}"),
        ),
        (
            "advertise-client-urls",
            format!("https://{a}:{CLIENT_PORT}"),
        ),
        ("cert-file", HOST_CERT.into()),
        ("key-file", HOST_KEY.into()),
        ("trusted-ca-file", HOST_CA.into()),
        ("client-cert-auth", "true".into()),
        ("peer-cert-file", HOST_CERT.into()),
        ("peer-key-file", HOST_KEY.into()),
        ("peer-trusted-ca-file", HOST_CA.into()),
        ("peer-client-cert-auth", "true".into()),
        // Slow links and busy hosts (Flatcar's advice for clouds).
        ("heartbeat-interval", "500".into()),
        ("election-timeout", "5000".into()),
    ]);
    for (k, v) in etcd2 {
        let _ = writeln!(y, "    {k}: {v}");
    }
    y.push_str("  update:\n");
    let _ = writeln!(y, "    group: {}", quoted(&site.group));
    if let Some(s) = &site.server {
        let _ = writeln!(y, "    server: {}", quoted(s));
    }
    y.push_str(match site.fleetlock_url {
        Some(_) => "    reboot-strategy: fleetlock\n",
        None => "    reboot-strategy: etcd-lock\n",
    });
    y.push_str("  locksmith:\n");
    if let Some(u) = &site.fleetlock_url {
        let _ = writeln!(y, "    fleetlock_url: {}", quoted(u));
    }
    let _ = writeln!(y, "    endpoint: {}", endpoints.join(","));
    let _ = writeln!(y, "    etcd_cafile: {HOST_CA}");
    let _ = writeln!(y, "    etcd_certfile: {HOST_CERT}");
    let _ = writeln!(y, "    etcd_keyfile: {HOST_KEY}");
    if !site.units.is_empty() {
        y.push_str("  units:\n");
        y.push_str(&site.units);
    }
    y.push_str("nimbus:\n");
    y.push_str(&site.nimbus);
    // Every member a manager: swarm's raft keeps quorum while one of
    // three reboots. All but the first join as workers and are promoted.
    y.push_str("  swarm:\n    role: manager\n");
    let _ = writeln!(
        y,
        "    advertise_addr: {}",
        me.map_or_else(|| "$private_ipv4".to_string(), |m| m.addr.to_string())
    );
    let hex: String = pki
        .swarm_secret
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let _ = writeln!(y, "    secret: {hex}");
    let _ = writeln!(
        y,
        "    managers: [{}]",
        members
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if who.is_none() {
        // Whichever member claims it first in etcd.
        y.push_str("    init: auto\n");
    } else if who == Some(0) {
        y.push_str("    init: true\n");
    } else {
        let _ = writeln!(
            y,
            "    join: ['{}:{SWARM_PORT}']",
            url_host(members[0].addr)
        );
    }
    Ok(y)
}

/// Everything `cloud-config validate` would say of `ud` (errors and
/// warnings), or nothing.
pub fn validate(ud: &str) -> Vec<String> {
    use nimbus_cloud_config::schema::{check, UserData};
    use nimbus_cloud_config::subst;
    // As `cloud-config validate` does: `$private_ipv4` and its kin get
    // documentation addresses, so their shape is checked.
    let ud = match subst::substitute(ud, &subst::Addresses::placeholders(), "validation") {
        Ok(t) => t,
        Err(e) => return vec![e.to_string()],
    };
    let (data, problems) = check(&ud);
    let mut out: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    if out.is_empty() && !matches!(data, Some(UserData::CloudConfig(_))) {
        out.push("not a #cloud-config document".into());
    }
    out
}

/// A new file, 0600 or 0644, that must not exist yet.
fn create(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("{}: creating", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: writing", path.display()))
}

pub fn run(a: &ClusterConfigArgs) -> anyhow::Result<()> {
    let members = parse_hosts(&a.hosts).map_err(anyhow::Error::msg)?;
    let mut ssh_keys = Vec::new();
    if let Some(k) = &a.ssh_key {
        let text = if Path::new(k).is_file() {
            std::fs::read_to_string(k).with_context(|| format!("--ssh-key {k}"))?
        } else {
            k.clone()
        };
        for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !l.starts_with("ssh-") && !l.starts_with("ecdsa-") && !l.starts_with("sk-") {
                bail!(
                    "--ssh-key: {:?} is not an SSH public key",
                    l.chars().take(40).collect::<String>()
                );
            }
            ssh_keys.push(l.to_string());
        }
    }
    if let Some(s) = &a.server {
        let u = reqwest::Url::parse(s).with_context(|| format!("--server {s:?}"))?;
        if !matches!(u.scheme(), "http" | "https") {
            bail!("--server {s:?}: not an http or https URL");
        }
    }
    if let Ok(mut d) = std::fs::read_dir(&a.out) {
        if d.next().is_some() {
            bail!(
                "--out {}: not empty; cluster-config writes a new CA into a new directory",
                a.out.display()
            );
        }
    }
    if let Some(u) = &a.discovery {
        let url = reqwest::Url::parse(u).with_context(|| format!("--discovery {u:?}"))?;
        if !matches!(url.scheme(), "http" | "https") || !url.path().starts_with("/v2/keys/") {
            bail!("--discovery {u:?}: not etcd's discovery protocol (http(s)://HOST:PORT/v2/keys/discovery/TOKEN)");
        }
    }
    let pki = make_pki(&members, a.days, a.shared)?;
    let site = Site {
        ssh_keys,
        server: a.server.clone(),
        group: a.group.clone(),
        fleetlock_url: a.fleetlock_url.clone(),
        ..Site::default()
    };
    // Each document under its path in --out: one `user-data` for every
    // member, or `<name>/user-data` each.
    let mut docs: Vec<(String, String)> = Vec::new();
    if a.shared {
        docs.push((
            "user-data".into(),
            shared_user_data(&members, &pki, &site, a.discovery.as_deref())?,
        ));
    } else {
        for (i, m) in members.iter().enumerate() {
            docs.push((
                format!("{}/user-data", m.name),
                user_data(&members, i, &pki, &site)?,
            ));
        }
    }
    // What the hosts will check at boot, checked before anything is written.
    for (path, ud) in &docs {
        let problems = validate(ud);
        if !problems.is_empty() {
            bail!(
                "{path}: the user-data made does not validate:\n{}",
                problems.join("\n")
            );
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    create(&a.out.join("ca.pem"), pki.ca.cert.as_bytes(), false)?;
    create(&a.out.join("ca-key.pem"), pki.ca.key.as_bytes(), true)?;
    create(&a.out.join("admin.pem"), pki.admin.cert.as_bytes(), false)?;
    create(&a.out.join("admin-key.pem"), pki.admin.key.as_bytes(), true)?;
    let mut dirs = vec![a.out.clone()];
    for (path, ud) in &docs {
        let f = a.out.join(path);
        if let Some(d) = f.parent().filter(|d| *d != a.out) {
            std::fs::create_dir(d).with_context(|| d.display().to_string())?;
            dirs.push(d.to_path_buf());
        }
        create(&f, ud.as_bytes(), true)?;
    }
    // Sync the directory entries: the CA key is the one copy there is.
    for d in &dirs {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: sync", d.display()))?;
    }
    println!(
        "cluster-config: {} for {} host(s) in {}: ca.pem, ca-key.pem (keep it offline), admin.pem, admin-key.pem, {}",
        if a.shared { "one user-data" } else { "a user-data each" },
        members.len(),
        a.out.display(),
        docs.iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Vec<Member> {
        parse_hosts("h1=10.0.0.11,h2=10.0.0.12,h3=10.0.0.13").unwrap()
    }

    #[test]
    fn the_shared_user_data_names_no_host_and_validates() {
        let m =
            parse_hosts("core-01=172.17.8.101,core-02=172.17.8.102,core-03=172.17.8.103").unwrap();
        let pki = make_pki(&m, 30, true).unwrap();
        assert_eq!(pki.hosts.len(), 1);
        let site = Site {
            group: "stable".into(),
            ..Site::default()
        };
        for discovery in [None, Some("http://172.17.8.1:4001/v2/keys/discovery/t1")] {
            let ud = shared_user_data(&m, &pki, &site, discovery).unwrap();
            assert_eq!(validate(&ud), Vec::<String>::new(), "{ud}");
            assert!(
                !ud.contains("hostname:") && !ud.contains("    name:"),
                "{ud}"
            );
            assert!(
                ud.contains("advertise_addr: $private_ipv4") && ud.contains("init: auto"),
                "{ud}"
            );
            assert!(
                ud.contains("initial-advertise-peer-urls: https://$private_ipv4:2380"),
                "{ud}"
            );
            match discovery {
                Some(u) => assert!(
                    ud.contains(&format!("discovery: {u}")) && !ud.contains("initial-cluster:"),
                    "{ud}"
                ),
                None => assert!(
                    ud.contains("initial-cluster: core-01=https://172.17.8.101:2380,core-02="),
                    "{ud}"
                ),
            }
        }
        // The one certificate serves every member's address.
        let der = pem_der(&pki.hosts[0].cert);
        for ip in [[172, 17, 8, 101], [172, 17, 8, 103], [127, 0, 0, 1]] {
            assert!(
                der.windows(4).any(|w| w == ip),
                "{ip:?} not in the shared certificate"
            );
        }
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }

    #[test]
    fn hosts_are_checked() {
        assert_eq!(three().len(), 3);
        for (bad, says) in [
            ("", "no member"),
            ("h1", "not NAME=ADDRESS"),
            ("H1=10.0.0.1", "not a host name"),
            ("h1=10.0.0", "not an IP address"),
            ("h1=127.0.0.1", "cannot be reached"),
            ("h1=0.0.0.0", "cannot be reached"),
            ("h1=10.0.0.1,h1=10.0.0.2", "given twice"),
            ("h1=10.0.0.1,h2=10.0.0.1", "share 10.0.0.1"),
        ] {
            let e = parse_hosts(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn every_members_user_data_validates_and_has_no_plain_http() {
        let m = three();
        let pki = make_pki(&m, 30, false).unwrap();
        let site = Site {
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0 op@site".into()],
            server: Some("https://updates.example.com/".into()),
            group: "stable".into(),
            ..Site::default()
        };
        for i in 0..3 {
            let ud = user_data(&m, i, &pki, &site).unwrap();
            let problems = validate(&ud);
            assert!(problems.is_empty(), "{problems:#?}\n{ud}");
            assert!(!ud.contains("http://"), "{ud}");
            assert!(ud.contains(&pki.hosts[i].key.lines().nth(1).unwrap().to_string()));
            // No other host's key.
            for (j, p) in pki.hosts.iter().enumerate() {
                if j != i {
                    assert!(
                        !ud.contains(p.key.lines().nth(1).unwrap()),
                        "{i} holds {j}'s key"
                    );
                }
            }
            assert!(!ud.contains(pki.ca.key.lines().nth(1).unwrap()));
            let c = nimbus_cloud_config::schema::check(&ud).0;
            let Some(nimbus_cloud_config::schema::UserData::CloudConfig(c)) = c else {
                panic!("{ud}");
            };
            let sw = c.nimbus.and_then(|n| n.swarm).expect("a swarm section");
            assert_eq!(sw.secret, Some(pki.swarm_secret.clone()));
            assert_eq!(sw.managers, ["h1", "h2", "h3"]);
            assert_eq!(sw.init == nimbus::swarmconf::Init::Yes, i == 0);
        }
    }

    #[test]
    fn the_certificates_chain_to_the_ca_and_name_their_host() {
        let m = three();
        let pki = make_pki(&m, 30, false).unwrap();
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca.pem");
        std::fs::write(&ca, &pki.ca.cert).unwrap();
        for (i, p) in pki.hosts.iter().chain([&pki.admin]).enumerate() {
            let c = d.path().join(format!("{i}.pem"));
            std::fs::write(&c, &p.cert).unwrap();
            let o = std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(&ca)
                .arg(&c)
                .output()
                .expect("openssl (the openssl package) checks the chain");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            if i < m.len() {
                let o = std::process::Command::new("openssl")
                    .args([
                        "x509",
                        "-noout",
                        "-ext",
                        "subjectAltName,extendedKeyUsage",
                        "-in",
                    ])
                    .arg(&c)
                    .output()
                    .unwrap();
                let t = String::from_utf8_lossy(&o.stdout);
                for want in [
                    format!("DNS:{}", m[i].name),
                    format!("IP Address:{}", m[i].addr),
                    "IP Address:127.0.0.1".into(),
                    "TLS Web Server Authentication".into(),
                    "TLS Web Client Authentication".into(),
                ] {
                    assert!(t.contains(&want), "{want} in {t}");
                }
            }
        }
    }

    #[test]
    fn a_fleetlock_site_reboots_through_its_server() {
        let m = three();
        let pki = make_pki(&m, 30, false).unwrap();
        let site = Site {
            server: Some("https://updates.example.com/".into()),
            group: "stable".into(),
            fleetlock_url: Some("https://lock.example.com:3333".into()),
            ..Site::default()
        };
        let ud = user_data(&m, 0, &pki, &site).unwrap();
        let problems = validate(&ud);
        assert!(problems.is_empty(), "{problems:#?}\n{ud}");
        assert!(ud.contains("reboot-strategy: fleetlock"), "{ud}");
        assert!(
            ud.contains("fleetlock_url: 'https://lock.example.com:3333'"),
            "{ud}"
        );
        assert!(!ud.contains("etcd-lock"), "{ud}");
    }

    #[test]
    fn out_must_be_new_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let a = ClusterConfigArgs {
            hosts: "a=192.168.5.1,b=192.168.5.2,c=192.168.5.3".into(),
            out: d.path().join("c"),
            ssh_key: None,
            server: None,
            group: "beta".into(),
            fleetlock_url: None,
            shared: false,
            discovery: None,
            days: 10,
        };
        run(&a).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(a.out.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca-key.pem"), 0o600);
        assert_eq!(mode("admin-key.pem"), 0o600);
        assert_eq!(mode("b/user-data"), 0o600);
        assert_eq!(mode("ca.pem"), 0o644);
        let e = run(&a).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        let bad = ClusterConfigArgs {
            ssh_key: Some("not a key".into()),
            out: d.path().join("x"),
            ..a
        };
        let e = format!("{:#}", run(&bad).unwrap_err());
        assert!(e.contains("not an SSH public key"), "{e}");
        assert!(
            !d.path().join("x").exists(),
            "nothing written for a bad command line"
        );
        // --shared: one user-data, private, beside the CA.
        let shared = ClusterConfigArgs {
            out: d.path().join("s"),
            shared: true,
            discovery: Some("http://192.168.5.254:4001/v2/keys/discovery/abc".into()),
            ..bad
        };
        let shared = ClusterConfigArgs {
            ssh_key: None,
            ..shared
        };
        run(&shared).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(shared.out.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("user-data"), 0o600);
        assert!(!shared.out.join("a").exists());
        let ud = std::fs::read_to_string(shared.out.join("user-data")).unwrap();
        assert!(
            ud.contains("discovery: http://192.168.5.254:4001/v2/keys/discovery/abc"),
            "{ud}"
        );
        let not_discovery = ClusterConfigArgs {
            out: d.path().join("t"),
            discovery: Some("http://192.168.5.254:4001/new".into()),
            ..shared
        };
        let e = format!("{:#}", run(&not_discovery).unwrap_err());
        assert!(e.contains("not etcd's discovery protocol"), "{e}");
    }
}
