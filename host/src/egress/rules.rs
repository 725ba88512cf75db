//! The allow-list: what a sandbox may reach through the egress proxy, and
//! which addresses a name may lead to. Pure: resolving is the caller's.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::EgressConfig;

/// Why an allow-list or `hosts` entry is refused.
#[derive(Debug, thiserror::Error)]
#[error("[egress] {key} entry {entry:?}: {why}")]
pub struct RuleError {
    key: &'static str,
    entry: String,
    why: String,
}

/// What one allow-list entry admits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Exactly this name (lower case, no trailing dot).
    Name(String),
    /// Any name ending in `.suffix` (not `suffix` itself).
    Subdomains(String),
    /// Addresses in `net/prefix` (a single address has the full prefix).
    Network(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    pattern: Pattern,
    /// `None`: any port.
    port: Option<u16>,
}

/// The host a request names: a name, or an address literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lower case, without a trailing dot.
    Name(String),
    /// An address literal (`10.1.2.3`, `[::1]`).
    Address(IpAddr),
}

impl Host {
    /// The host part of a request's authority (`example.org`, `10.0.0.1`,
    /// `[::1]`, brackets removed by the caller or not).
    pub fn parse(host: &str) -> Host {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Address(ip),
            Err(_) => Host::Name(normal_name(host)),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Address(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Address(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why the proxy refused a destination: said in its 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Neither the name nor the address (and port) is listed.
    #[error(
        "{host}:{port} is not in this sandbox host's egress allow-list; an operator can add \
         it to `[egress] allow` in the host's configuration"
    )]
    NotListed {
        /// The destination as requested.
        host: String,
        /// Its port.
        port: u16,
    },
    /// The name is listed but leads to an address only listed addresses
    /// may use.
    #[error(
        "{host} resolves to {address}, a {class} address, which a name never reaches; an \
         operator who means it can list the address itself in `[egress] allow`"
    )]
    Private {
        /// The listed name.
        host: String,
        /// What it resolved to.
        address: IpAddr,
        /// `private`, `loopback`, `link-local`, ...
        class: &'static str,
    },
}

/// The parsed `[egress]` settings.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    allow: Vec<Entry>,
    hosts: BTreeMap<String, IpAddr>,
}

impl Rules {
    /// Parses `config`, naming the first entry that does not parse.
    pub fn new(config: &EgressConfig) -> Result<Rules, RuleError> {
        let allow = config
            .allow
            .iter()
            .map(|entry| {
                parse_entry(entry).map_err(|why| RuleError {
                    key: "allow",
                    entry: entry.clone(),
                    why,
                })
            })
            .collect::<Result<_, _>>()?;
        let hosts = config
            .hosts
            .iter()
            .map(|(name, address)| {
                let ip = address
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map_err(|_| RuleError {
                        key: "hosts",
                        entry: format!("{name} = {address}"),
                        why: "the value must be an IP address".into(),
                    })?;
                Ok((normal_name(name), ip))
            })
            .collect::<Result<_, RuleError>>()?;
        Ok(Rules { allow, hosts })
    }

    /// Whether nothing at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }

    /// The first check, before any resolving: the destination is listed.
    pub fn admit(&self, host: &Host, port: u16) -> Result<(), Refusal> {
        let listed = self.allow.iter().any(|entry| {
            entry.port.is_none_or(|p| p == port)
                && match (&entry.pattern, host) {
                    (Pattern::Name(n), Host::Name(name)) => n == name,
                    (Pattern::Subdomains(suffix), Host::Name(name)) => name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|rest| !rest.is_empty()),
                    (Pattern::Network(net, bits), Host::Address(ip)) => contains(*net, *bits, *ip),
                    _ => false,
                }
        });
        if listed {
            Ok(())
        } else {
            Err(Refusal::NotListed {
                host: host.to_string(),
                port,
            })
        }
    }

    /// The address `hosts` gives `name`, if any (the proxy asks DNS
    /// otherwise).
    pub fn pinned(&self, name: &str) -> Option<IpAddr> {
        self.hosts.get(name).copied()
    }

    /// The second check, on what an admitted name resolved to: an address
    /// only listed addresses may use (private, loopback, link-local, ...)
    /// must be listed by address. An address literal was admitted as such.
    pub fn admit_resolved(&self, host: &Host, to: SocketAddr) -> Result<(), Refusal> {
        let Host::Name(name) = host else {
            return Ok(());
        };
        let Some(class) = special_class(to.ip()) else {
            return Ok(());
        };
        self.admit(&Host::Address(canonical(to.ip())), to.port())
            .map_err(|_| Refusal::Private {
                host: name.clone(),
                address: to.ip(),
                class,
            })
    }
}

fn normal_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// One allow-list entry (see [`EgressConfig::allow`]).
fn parse_entry(entry: &str) -> Result<Entry, String> {
    let entry = entry.trim();
    if entry.is_empty() {
        return Err("empty".into());
    }
    // `[v6]:port`, `[v6]`, `[v6/bits]:port`
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or("an opening `[` without its `]`")?;
        let port = match after {
            "" => None,
            p => Some(parse_port(p.strip_prefix(':').ok_or("text after `]`")?)?),
        };
        let (ip, bits) = parse_network(inside)?;
        return Ok(Entry {
            pattern: Pattern::Network(ip, bits),
            port,
        });
    }
    // A bare IPv6 address or network (more than one `:`): no port.
    if entry.matches(':').count() > 1 {
        let (ip, bits) = parse_network(entry)?;
        return Ok(Entry {
            pattern: Pattern::Network(ip, bits),
            port: None,
        });
    }
    let (host, port) = match entry.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (entry, None),
    };
    if host.starts_with(|c: char| c.is_ascii_digit()) && parse_network(host).is_ok() {
        let (ip, bits) = parse_network(host)?;
        return Ok(Entry {
            pattern: Pattern::Network(ip, bits),
            port,
        });
    }
    let name = normal_name(host);
    let (wild, name) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest.to_owned()),
        None => (false, name),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(
            "not a name, `*.name`, address or network (a wildcard stands for whole leading \
             labels only: `*.example.org`)"
                .into(),
        );
    }
    Ok(Entry {
        pattern: if wild {
            Pattern::Subdomains(format!(".{name}"))
        } else {
            Pattern::Name(name)
        },
        port,
    })
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("port {text:?} must be 1-65535")),
        Ok(port) => Ok(port),
    }
}

/// `addr` or `addr/bits`.
fn parse_network(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, bits) = match text.split_once('/') {
        Some((addr, bits)) => (addr, Some(bits)),
        None => (text, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        None => max,
        Some(b) => match b.parse::<u8>() {
            Ok(b) if b <= max => b,
            _ => return Err(format!("prefix length {b:?} must be 0-{max}")),
        },
    };
    Ok((canonical(ip), bits))
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (net, canonical(ip)) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// The class of an address a name may not lead to unless listed: anything
/// but a global unicast address.
pub fn special_class(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("multicast or reserved")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol")
    } else if ip.is_documentation() || (a == 198 && (b & 0xfe) == 18) {
        Some("documentation or benchmarking")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if (first & 0xfe00) == 0xfc00 {
        Some("private (unique local)")
    } else if (first & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast or reserved")
    } else if first == 0x2001 && ip.segments()[1] == 0x0db8 {
        Some("documentation or benchmarking")
    } else if first == 0x0064 && ip.segments()[1] == 0xff9b {
        // NAT64 prefixes embed IPv4 addresses, private ones included.
        Some("translated (NAT64)")
    } else if first == 0x2002 || ip.segments()[..6] == [0, 0, 0, 0, 0, 0] {
        // 6to4 and IPv4-compatible addresses embed IPv4 ones too.
        Some("IPv4-embedding")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], hosts: &[(&str, &str)]) -> Rules {
        Rules::new(&EgressConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            hosts: hosts
                .iter()
                .map(|(n, a)| (n.to_string(), a.to_string()))
                .collect(),
            metrics_per_user: false,
        })
        .unwrap()
    }

    fn admits(r: &Rules, host: &str, port: u16) -> bool {
        r.admit(&Host::parse(host), port).is_ok()
    }

    #[test]
    fn names_wildcards_ports_addresses_and_networks() {
        let r = rules(
            &[
                "pypi.org",
                "*.pythonhosted.org",
                "api.example.com:8443",
                "10.1.2.3:8080",
                "192.0.2.0/24",
                "[2001:db8::1]:443",
                "fd00::/8",
            ],
            &[],
        );
        assert!(admits(&r, "pypi.org", 443));
        assert!(admits(&r, "PyPI.org.", 80));
        assert!(!admits(&r, "evil-pypi.org", 443));
        assert!(!admits(&r, "pypi.org.evil.com", 443));
        assert!(admits(&r, "files.pythonhosted.org", 443));
        assert!(admits(&r, "a.b.pythonhosted.org", 443));
        assert!(!admits(&r, "pythonhosted.org", 443), "apex not covered");
        assert!(!admits(&r, "xpythonhosted.org", 443));
        assert!(admits(&r, "api.example.com", 8443));
        assert!(!admits(&r, "api.example.com", 443));
        assert!(admits(&r, "10.1.2.3", 8080));
        assert!(!admits(&r, "10.1.2.3", 80));
        assert!(!admits(&r, "10.1.2.4", 8080));
        assert!(admits(&r, "192.0.2.77", 22));
        assert!(!admits(&r, "192.0.3.1", 22));
        assert!(admits(&r, "[2001:db8::1]", 443));
        assert!(!admits(&r, "[2001:db8::1]", 80));
        assert!(admits(&r, "[fd12::5]", 80));
        assert!(admits(&r, "[::ffff:192.0.2.9]", 80), "mapped v4 is v4");
        // A name never matches an address entry, nor the reverse.
        assert!(!admits(&r, "3.2.1.10.in-addr.arpa", 8080));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in [
            "",
            "pypi.org:0",
            "pypi.org:70000",
            "10.0.0.0/33",
            "[::1",
            "exa mple.com",
            "*",
            "foo.*.com",
            "http://pypi.org",
        ] {
            let e = Rules::new(&EgressConfig {
                allow: vec![bad.into()],
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.to_string().contains("[egress] allow"), "{bad}: {e}");
        }
        let e = Rules::new(&EgressConfig {
            hosts: [("a.test".to_string(), "not-an-ip".to_string())].into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("[egress] hosts"), "{e}");
    }

    #[test]
    fn a_name_reaches_a_private_address_only_when_the_address_is_listed() {
        let host = Host::parse("internal.test");
        let at = |ip: &str, port| SocketAddr::new(ip.parse().unwrap(), port);
        let r = rules(&["internal.test"], &[]);
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.18.0.2",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
        ] {
            let refusal = r.admit_resolved(&host, at(ip, 80)).unwrap_err();
            assert!(
                matches!(refusal, Refusal::Private { .. }),
                "{ip}: {refusal}"
            );
            assert!(refusal.to_string().contains("list the address"));
        }
        assert!(r.admit_resolved(&host, at("151.101.0.223", 443)).is_ok());
        assert!(r.admit_resolved(&host, at("2a04:4e42::223", 443)).is_ok());
        let listed = rules(&["internal.test", "172.18.0.0/16:80"], &[]);
        assert!(listed.admit_resolved(&host, at("172.18.0.2", 80)).is_ok());
        assert!(listed.admit_resolved(&host, at("172.18.0.2", 81)).is_err());
        // An address literal was admitted by address already.
        let literal = Host::parse("10.1.2.3");
        assert!(r.admit_resolved(&literal, at("10.1.2.3", 80)).is_ok());
    }

    #[test]
    fn hosts_pin_names_to_addresses() {
        let r = rules(
            &[],
            &[("Upstream.Test", "172.18.0.2"), ("v6.test", "[fd00::2]")],
        );
        assert_eq!(
            r.pinned("upstream.test"),
            Some("172.18.0.2".parse().unwrap())
        );
        assert_eq!(r.pinned("v6.test"), Some("fd00::2".parse().unwrap()));
        assert_eq!(r.pinned("other.test"), None);
        assert!(r.is_empty());
    }

    #[test]
    fn refusals_name_the_host_and_the_setting() {
        let r = rules(&[], &[]);
        let e = r.admit(&Host::parse("example.org"), 443).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("example.org:443") && text.contains("[egress] allow"),
            "{text}"
        );
    }
}
