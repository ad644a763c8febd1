//! `--allowed-destinations`: which addresses the agent dials for the servers.
//! Entries are CIDRs or `node` (this node's own addresses), each optionally with a port or
//! port range: `node:10250`, `10.0.0.0/8`, `10.96.0.0/12:443`, `[fd00::/64]:8000-8999`.
//! Empty (the default) allows everything, as upstream does.
use anyhow::{anyhow, Result};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A network: address and prefix length; a bare address is one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

fn parse_cidr(s: &str) -> Result<Cidr> {
    let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
    let addr: IpAddr = a.parse().map_err(|_| anyhow!("bad address {a:?}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| anyhow!("bad prefix {p:?}"))?,
        None => max,
    };
    Ok(Cidr { addr, prefix })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Node,
    Net(Cidr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    target: Target,
    ports: Option<(u16, u16)>,
}

#[derive(Debug, Default)]
pub struct Destinations {
    rules: Vec<Rule>,
    node_cache: Mutex<Option<(Instant, Vec<IpAddr>)>>,
}

fn parse_ports(p: &str) -> Result<(u16, u16)> {
    let (lo, hi) = p.split_once('-').unwrap_or((p, p));
    let lo: u16 = lo.parse().map_err(|_| anyhow!("bad port {p:?}"))?;
    let hi: u16 = hi.parse().map_err(|_| anyhow!("bad port {p:?}"))?;
    if lo == 0 || hi < lo {
        return Err(anyhow!("bad port range {p:?}"));
    }
    Ok((lo, hi))
}

fn parse_rule(entry: &str) -> Result<Rule> {
    // `[v6cidr]:port`, `v4cidr:port`, `node:port`, or any of them without a port.
    let (target, ports) = if let Some(rest) = entry.strip_prefix('[') {
        let (net, tail) = rest
            .split_once(']')
            .ok_or_else(|| anyhow!("missing ']' in {entry:?}"))?;
        let ports = match tail.strip_prefix(':') {
            Some(p) => Some(parse_ports(p)?),
            None if tail.is_empty() => None,
            None => return Err(anyhow!("unexpected {tail:?} after ']' in {entry:?}")),
        };
        (net, ports)
    } else if entry.matches(':').count() == 1 {
        let (t, p) = entry.split_once(':').unwrap_or((entry, ""));
        (t, Some(parse_ports(p)?))
    } else {
        (entry, None)
    };
    let target = if target == "node" {
        Target::Node
    } else {
        Target::Net(parse_cidr(target)?)
    };
    Ok(Rule { target, ports })
}

fn cidr_contains(c: &Cidr, ip: IpAddr) -> bool {
    match (c.addr, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(c.prefix)).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(c.prefix))
                .unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// This node's addresses (every interface, loopback included).
fn node_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

impl Destinations {
    pub fn parse(list: &[String]) -> Result<Self> {
        let rules = list
            .iter()
            .map(|e| parse_rule(e).map_err(|err| anyhow!("--allowed-destinations {e:?}: {err:#}")))
            .collect::<Result<_>>()?;
        Ok(Self {
            rules,
            node_cache: Mutex::new(None),
        })
    }

    pub fn allow_all(&self) -> bool {
        self.rules.is_empty()
    }

    fn is_node(&self, ip: IpAddr) -> bool {
        let mut cache = self.node_cache.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = cache
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(10));
        if !fresh {
            *cache = Some((Instant::now(), node_addresses()));
        }
        cache.as_ref().is_some_and(|(_, addrs)| addrs.contains(&ip))
    }

    pub fn allows(&self, dest: SocketAddr) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let ip = dest.ip().to_canonical();
        self.rules.iter().any(|r| {
            r.ports
                .is_none_or(|(lo, hi)| (lo..=hi).contains(&dest.port()))
                && match &r.target {
                    Target::Node => self.is_node(ip),
                    Target::Net(c) => cidr_contains(c, ip),
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(list: &[&str]) -> Destinations {
        Destinations::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn cidrs_and_ports() {
        let p = d(&["10.0.0.0/8", "192.168.1.0/24:443", "[fd00::/64]:8000-8999"]);
        assert!(p.allows("10.1.2.3:80".parse().unwrap()));
        assert!(!p.allows("11.1.2.3:80".parse().unwrap()));
        assert!(p.allows("192.168.1.9:443".parse().unwrap()));
        assert!(!p.allows("192.168.1.9:444".parse().unwrap()));
        assert!(p.allows("[fd00::5]:8080".parse().unwrap()));
        assert!(!p.allows("[fd00::5]:9000".parse().unwrap()));
        assert!(!p.allows("[fd01::5]:8080".parse().unwrap()));
    }

    #[test]
    fn node_means_own_addresses() {
        let p = d(&["node:10250"]);
        assert!(p.allows("127.0.0.1:10250".parse().unwrap()));
        assert!(!p.allows("127.0.0.1:10251".parse().unwrap()));
        assert!(!p.allows("203.0.113.7:10250".parse().unwrap()));
    }

    #[test]
    fn empty_allows_all_and_bad_entries_fail() {
        assert!(d(&[]).allows("203.0.113.7:1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "node:0",
            "node:9-1",
            "[fd00::/64",
            "nodes",
            "1.2.3.4:x",
        ] {
            assert!(Destinations::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
