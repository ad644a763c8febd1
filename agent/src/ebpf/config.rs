//! Command-line flags and the parsed configuration of the eBPF data plane.
use std::{fmt, net::IpAddr, path::PathBuf, str::FromStr};

use anyhow::{bail, Context};

/// `--ebpf`: whether the eBPF programs are required, best effort, or not used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Load what the kernel and the process's rights allow; the userspace relay covers the rest.
    #[default]
    Auto,
    /// Every requested program must attach, or the agent refuses to start.
    On,
    /// Never load eBPF programs.
    Off,
}

impl fmt::Display for EbpfMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EbpfMode::Auto => "auto",
            EbpfMode::On => "on",
            EbpfMode::Off => "off",
        })
    }
}

/// An IPv4 or IPv6 network in CIDR notation; a bare address means a single host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Cidr> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .with_context(|| format!("invalid CIDR {s:?}: bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .with_context(|| format!("invalid CIDR {s:?}: prefix must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What `Ebpf::load` should try to set up.
#[derive(Clone, Debug, Default)]
pub struct EbpfConfig {
    pub mode: EbpfMode,
    /// Endpoint ports whose legs the fast path redirects.
    pub fast_path_ports: Vec<u16>,
    /// cgroup v2 directory for sock_ops; `None` means the cgroup2 root found in /proc/mounts.
    pub cgroup_path: Option<PathBuf>,
    pub xdp_guard_interfaces: Vec<String>,
    pub xdp_protected_ports: Vec<u16>,
    pub xdp_allow_cidrs: Vec<Cidr>,
}

/// Flags of the eBPF data plane; `#[command(flatten)]` this into the agent's options.
#[derive(Clone, Debug, clap::Args)]
pub struct EbpfArgs {
    /// eBPF data plane: auto (best effort, fall back to the userspace relay), on (required),
    /// off.
    #[arg(long = "ebpf", env = "SPOKE_EBPF", value_enum, default_value_t = EbpfMode::Auto)]
    pub mode: EbpfMode,

    /// cgroup v2 directory the sock_ops program attaches to; it must contain both the agent
    /// and the local endpoints it dials. Default: the cgroup2 mount root.
    #[arg(long, env = "SPOKE_CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,

    /// Endpoint ports whose legs the socket fast path redirects (comma-separated; empty, the
    /// default, loads no fast path). Only endpoints known to read with read()/recvmsg() and to
    /// wait for readiness after EAGAIN belong here: bytes sk_msg redirects are invisible to a
    /// reader that uses splice(2) (Go's io.Copy between TCP connections does), and the kernel
    /// returns EAGAIN even to a blocking read of a redirect target that wakes without data,
    /// and after a backlog fallback (which the agent avoids by waiting for a lagging reader)
    /// a read may be short while more is queued (a reader that then waits for the next
    /// epoll edge, as tokio's and nginx's do, may wait for ever).
    /// The kubelet (10250) reads through Go's TLS stack and netpoller. Off by
    /// default because under the kernel's default congestion control (cubic) the redirect cost
    /// the agent more CPU per byte than loopback TCP (BENCHMARKS.md); it saved CPU where TCP
    /// paces every socket (bbr without the fq qdisc).
    #[arg(long, env = "SPOKE_EBPF_FAST_PATH_PORTS", default_value = "")]
    pub ebpf_fast_path_ports: String,

    /// Interfaces the XDP guard attaches to (comma-separated; empty disables the guard).
    #[arg(long, env = "SPOKE_XDP_GUARD_INTERFACES", default_value = "")]
    pub xdp_guard_interfaces: String,

    /// Local TCP ports the XDP guard protects (comma-separated).
    #[arg(long, env = "SPOKE_XDP_PROTECTED_PORTS", default_value = "10250")]
    pub xdp_protected_ports: String,

    /// Sources allowed to reach the protected ports (comma-separated CIDRs, IPv4 and IPv6).
    #[arg(long, env = "SPOKE_XDP_ALLOW_CIDRS", default_value = "")]
    pub xdp_allow_cidrs: String,
}

/// Splits a comma-separated flag value; `[]` and `[a,b]` (Go pflag's rendering) are accepted.
fn list(value: &str) -> impl Iterator<Item = &str> {
    let v = value.trim();
    let v = v
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(v);
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

impl EbpfArgs {
    pub fn config(&self) -> anyhow::Result<EbpfConfig> {
        let ports = |flag: &str, value: &str| {
            list(value)
                .map(|p| match p.parse::<u16>() {
                    Ok(port) if port != 0 => Ok(port),
                    _ => bail!("{flag}: {p:?} is not a TCP port"),
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        let xdp_protected_ports = ports("--xdp-protected-ports", &self.xdp_protected_ports)?;
        let fast_path_ports = ports("--ebpf-fast-path-ports", &self.ebpf_fast_path_ports)?;
        let xdp_allow_cidrs = list(&self.xdp_allow_cidrs)
            .map(|c| c.parse::<Cidr>().context("--xdp-allow-cidrs"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let xdp_guard_interfaces: Vec<String> =
            list(&self.xdp_guard_interfaces).map(String::from).collect();
        if let Some(bad) = xdp_guard_interfaces
            .iter()
            .find(|i| i.len() > 15 || i.contains(['/', '\0']))
        {
            bail!("--xdp-guard-interfaces: {bad:?} is not an interface name");
        }
        Ok(EbpfConfig {
            mode: self.mode,
            fast_path_ports,
            cgroup_path: self.cgroup_path.clone(),
            xdp_guard_interfaces,
            xdp_protected_ports,
            xdp_allow_cidrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ebpf: EbpfArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<EbpfConfig> {
        let cli = Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))?;
        cli.ebpf.config()
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(c.mode, EbpfMode::Auto);
        assert_eq!(c.xdp_protected_ports, vec![10250]);
        assert!(c.fast_path_ports.is_empty());
        assert!(c.xdp_guard_interfaces.is_empty());
        assert!(c.xdp_allow_cidrs.is_empty());
        assert!(c.cgroup_path.is_none());
    }

    #[test]
    fn lists_accept_pflag_brackets() {
        let c = parse(&[
            "--ebpf=on",
            "--xdp-guard-interfaces=[eth0, eth1]",
            "--xdp-protected-ports=[]",
            "--xdp-allow-cidrs=10.0.0.0/8,fd00::/64,192.0.2.7",
        ])
        .expect("parse");
        assert_eq!(c.mode, EbpfMode::On);
        assert_eq!(c.xdp_guard_interfaces, vec!["eth0", "eth1"]);
        assert!(c.xdp_protected_ports.is_empty());
        let cidrs: Vec<String> = c.xdp_allow_cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs, vec!["10.0.0.0/8", "fd00::/64", "192.0.2.7/32"]);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--xdp-allow-cidrs=10.0.0.0/33"]).is_err());
        assert!(parse(&["--xdp-allow-cidrs=nonsense"]).is_err());
        assert!(parse(&["--xdp-protected-ports=0"]).is_err());
        assert!(parse(&["--xdp-protected-ports=70000"]).is_err());
        assert!(parse(&["--xdp-guard-interfaces=a/b"]).is_err());
        assert!(parse(&["--ebpf-fast-path-ports=10250,http"]).is_err());
        assert!(parse(&["--ebpf=maybe"]).is_err());
    }
}
