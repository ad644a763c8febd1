//! spoke-agent flags: upstream proxy-agent's names and defaults, plus Spoke's own.
use crate::ebpf::EbpfArgs;
use anyhow::{bail, Result};
use clap::ArgAction::Set;
use clap::Parser;
use spoke_process::flags::{byte_size, go_duration, list};
use spoke_process::klog::KlogFlags;
use spoke_tunnel::identifiers::AgentIdentifiers;
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "spoke-agent",
    version,
    // As with Go's flag packages: a flag given twice takes its last value.
    args_override_self = true,
    about = "Konnectivity-compatible node agent: keeps mTLS tunnels to the proxy servers and dials local endpoints for them"
)]
pub struct Options {
    /// Client certificate for mTLS to the server (with --agent-key).
    #[arg(long, default_value = "")]
    pub agent_cert: String,
    #[arg(long, default_value = "")]
    pub agent_key: String,
    /// CA that signed the server's certificate.
    #[arg(long, default_value = "")]
    pub ca_cert: String,
    /// Proxy server address(es): one host (a load balancer or one server, as upstream), or
    /// several (repeat the flag or separate with commas): the agent connects to each until it
    /// holds serverCount distinct servers; a dead address does not delay the others. An entry
    /// may carry its own port (`host:port`, `[v6]:port`); others use --proxy-server-port.
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Append, default_value = "127.0.0.1")]
    pub proxy_server_host: Vec<String>,
    #[arg(long, default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// Extra ALPN protocols offered besides h2 (for ALPN-routing load balancers).
    #[arg(long, value_parser = list, default_value = "")]
    pub alpn_proto: std::vec::Vec<String>,

    #[arg(long, default_value = "")]
    pub health_server_host: String,
    /// /healthz, /readyz, /ready and /metrics.
    #[arg(long, default_value_t = 8093)]
    pub health_server_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    #[arg(long, default_value_t = 8094)]
    pub admin_server_port: u16,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub enable_profiling: bool,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub enable_contention_profiling: bool,

    /// Agent identity; default: $PROXY_AGENT_ID or a random UUID.
    #[arg(long, env = "PROXY_AGENT_ID", default_value = "")]
    pub agent_id: String,
    /// URL-encoded identifiers, e.g. `host=node1&ipv4=10.0.0.5&default-route=true`.
    #[arg(long, default_value = "")]
    pub agent_identifiers: String,

    #[arg(long, value_parser = go_duration, default_value = "1s")]
    pub sync_interval: Duration,
    #[arg(long, value_parser = go_duration, default_value = "1s")]
    pub probe_interval: Duration,
    #[arg(long, value_parser = go_duration, default_value = "10s")]
    pub sync_interval_cap: Duration,
    #[arg(long, value_parser = go_duration, default_value = "1h")]
    pub keepalive_time: Duration,
    /// Token sent as `Bearer` to the server; re-read on every connect.
    #[arg(long, default_value = "")]
    pub service_account_token_path: String,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub warn_on_channel_limit: bool,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub sync_forever: bool,
    /// Accepted for compatibility; Spoke bounds buffers in bytes (--max-connection-buffer-bytes).
    #[arg(long, default_value_t = 150)]
    pub xfr_channel_size: u32,
    /// Use the number of valid server leases (watched in --lease-namespace, matching
    /// --lease-label-selector) as the server count instead of the servers' serverCount header.
    /// Needs --kubeconfig or in-cluster credentials with list/watch on leases.
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub count_server_leases: bool,
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label_selector: String,
    /// Deprecated alias of --lease-label-selector.
    #[arg(long, default_value = "", hide = true)]
    pub lease_label: String,
    /// How the lease count and the servers' serverCount header combine: `default` (the lease
    /// count with --count-server-leases, else the header) or `max` (the larger of the two).
    #[arg(long, default_value = "default")]
    pub server_count_source: String,
    /// kubeconfig for lease counting; empty: in-cluster.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// Spoke: get the client certificate from the CSR API (with --cert-dir), authenticating
    /// with this kubeconfig; empty: the in-cluster service account.
    #[arg(long, default_value = "")]
    pub bootstrap_kubeconfig: String,
    /// Spoke: directory for the key and certificate obtained from the CSR API (created 0700;
    /// files 0600). Replaces --agent-cert/--agent-key; a valid stored certificate is used at
    /// start, and it is renewed at 70-90% of its lifetime.
    #[arg(long, default_value = "")]
    pub cert_dir: String,
    /// Spoke: signer of the agent's CSRs (its CA is what the server's --cluster-ca-cert trusts).
    #[arg(long, default_value = "kubernetes.io/kube-apiserver-client")]
    pub csr_signer_name: String,
    /// Spoke: requested certificate lifetime (spec.expirationSeconds, at least 10m); 0: the
    /// signer's default.
    #[arg(long, value_parser = go_duration, default_value = "0")]
    pub csr_expiration: Duration,
    /// Spoke: how long one CSR may wait for approval and issuance before the agent logs it and
    /// checks again.
    #[arg(long, value_parser = go_duration, default_value = "5m")]
    pub csr_approval_timeout: Duration,
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,

    /// Spoke: where the agent may dial: CIDRs or `node`, each with an optional port or
    /// range (`node:10250,10.0.0.0/8,[fd00::/64]:443`). Empty: anywhere, as upstream.
    #[arg(long, value_parser = list, default_value = "")]
    pub allowed_destinations: std::vec::Vec<String>,
    /// Spoke: after the first SIGTERM, how long the draining agent keeps serving (open and
    /// new dials) before it exits with status 0 (0: until a second signal, as upstream).
    #[arg(long, value_parser = go_duration, default_value = "0")]
    pub drain_timeout: Duration,
    /// Spoke: most open endpoint connections; dials past it are refused.
    #[arg(long, default_value_t = 50_000)]
    pub max_connections: usize,
    /// Spoke: most dials in progress; dials past it are refused.
    #[arg(long, default_value_t = 1_000)]
    pub max_pending_dials: usize,
    /// Spoke: bytes buffered across all connections before new dials are refused.
    #[arg(long, value_parser = byte_size, default_value = "512Mi")]
    pub max_buffered_bytes: usize,
    /// Spoke: how long a dial to a local endpoint may take (upstream: fixed 5s).
    #[arg(long, value_parser = go_duration, default_value = "5s")]
    pub dial_timeout: Duration,
    /// Spoke: the most one tunnelled connection may buffer. With a Spoke peer this is the
    /// ceiling of its flow-control window, which starts at 4Mi (or this, if smaller) and
    /// doubles while the peer is blocked on credit and the local end keeps up, so a long fat
    /// link is not capped at 4Mi per round trip; a reader that falls behind never grows it.
    /// With an upstream peer (no flow control) an inbox past this closes the connection.
    #[arg(long, value_parser = byte_size, default_value = "16Mi")]
    pub max_connection_buffer_bytes: usize,
    /// Spoke: largest gRPC message accepted or sent.
    #[arg(long, value_parser = byte_size, default_value = "32Mi")]
    pub max_grpc_message_size: usize,

    #[command(flatten)]
    pub ebpf: EbpfArgs,
    #[command(flatten)]
    pub klog: KlogFlags,
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` (a bare IPv6 address has no port).
pub fn split_host_port(entry: &str, default_port: u16) -> Result<(String, u16)> {
    let port = |p: &str| -> Result<u16> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => bail!("port {p:?} is not a port number"),
            Ok(n) => Ok(n),
        }
    };
    if let Some(rest) = entry.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            bail!("missing ']'");
        };
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_string(), port(p)?)),
            None if after.is_empty() => Ok((host.to_string(), default_port)),
            None => bail!("unexpected text after ']'"),
        };
    }
    match entry.split_once(':') {
        Some((host, p)) if !p.contains(':') => {
            if host.is_empty() {
                bail!("empty host");
            }
            Ok((host.to_string(), port(p)?))
        }
        _ => Ok((entry.to_string(), default_port)),
    }
}

impl Options {
    /// Every server address: `--proxy-server-host` entries with their port.
    pub fn server_addresses(&self) -> Vec<(String, u16)> {
        self.proxy_server_host
            .iter()
            .filter_map(|h| split_host_port(h, self.proxy_server_port).ok())
            .collect()
    }

    /// Checks flag combinations as upstream does; each error is one actionable line.
    pub fn validate(&mut self) -> Result<AgentIdentifiers> {
        if self.agent_id.is_empty() {
            self.agent_id = uuid::Uuid::new_v4().to_string();
        }
        if self.agent_cert.is_empty() != self.agent_key.is_empty() {
            bail!("--agent-cert and --agent-key must be given together");
        }
        if self.ca_cert.is_empty() {
            bail!("--ca-cert is required to verify the proxy server");
        }
        if !self.cert_dir.is_empty() && !self.agent_cert.is_empty() {
            bail!("--cert-dir (certificates from the CSR API) and --agent-cert/--agent-key are mutually exclusive");
        }
        if self.agent_cert.is_empty()
            && self.cert_dir.is_empty()
            && self.service_account_token_path.is_empty()
        {
            bail!("one of --agent-cert/--agent-key, --cert-dir or --service-account-token-path is required to authenticate to the server");
        }
        if !self.cert_dir.is_empty() && self.csr_approval_timeout.is_zero() {
            bail!("--csr-approval-timeout must be positive");
        }
        self.proxy_server_host.retain(|h| !h.trim().is_empty());
        for h in &mut self.proxy_server_host {
            *h = h.trim().to_string();
        }
        if self.proxy_server_host.is_empty() {
            bail!("--proxy-server-host must name at least one host");
        }
        let mut seen = std::collections::HashSet::new();
        self.proxy_server_host.retain(|h| seen.insert(h.clone()));
        for h in &self.proxy_server_host {
            split_host_port(h, 1).map_err(|e| anyhow::anyhow!("--proxy-server-host {h:?}: {e}"))?;
        }
        if self.proxy_server_port == 0 {
            bail!("--proxy-server-port must be non-zero");
        }
        if self.sync_interval.is_zero() {
            bail!("--sync-interval must be positive");
        }
        if self.sync_interval_cap < self.sync_interval {
            bail!(
                "--sync-interval-cap ({:?}) must be at least --sync-interval ({:?})",
                self.sync_interval_cap,
                self.sync_interval
            );
        }
        if self.probe_interval.is_zero() || self.dial_timeout.is_zero() {
            bail!("--probe-interval and --dial-timeout must be positive");
        }
        if self.enable_contention_profiling && !self.enable_profiling {
            bail!("--enable-contention-profiling requires --enable-profiling");
        }
        if !["default", "max"].contains(&self.server_count_source.as_str()) {
            bail!("--server-count-source must be default or max");
        }
        if !self.lease_label.is_empty() {
            tracing::warn!("--lease-label is deprecated: use --lease-label-selector");
            self.lease_label_selector = std::mem::take(&mut self.lease_label);
        }
        if self.count_server_leases {
            spoke_k8s::leases::check_selector_flag(&self.lease_label_selector)?;
        }
        AgentIdentifiers::parse(&self.agent_identifiers, true)
            .map_err(|e| anyhow::anyhow!("--agent-identifiers: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options> {
        let mut o =
            Options::try_parse_from(std::iter::once("spoke-agent").chain(args.iter().copied()))?;
        o.validate()?;
        Ok(o)
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value() {
        let o = parse(&[
            "--ca-cert=ca.pem",
            "--agent-cert=a.pem",
            "--agent-key=a.key",
            "--agent-id=first",
            "--agent-id=second",
        ])
        .unwrap();
        assert_eq!(o.agent_id, "second");
    }

    #[test]
    fn upstream_harness_spellings() {
        let o = parse(&[
            "--ca-cert=ca.pem",
            "--agent-cert=a.pem",
            "--agent-key=a.key",
            "--alpn-proto=[]",
            "--keepalive-time=1h0m0s",
            "--sync-interval=100ms",
            "--sync-interval-cap=1s",
            "--probe-interval=100ms",
            "--lease-label=k8s-app=konnectivity-server",
            "--kubeconfig=",
            "--agent-identifiers=",
            "--sync-forever=false",
            "--warn-on-channel-limit",
            "--v=4",
            "--logtostderr=true",
        ])
        .unwrap();
        assert_eq!(o.sync_interval, Duration::from_millis(100));
        assert!(o.alpn_proto.is_empty());
        assert!(o.warn_on_channel_limit);
        assert!(!o.agent_id.is_empty());
    }

    #[test]
    fn bad_combinations() {
        let base = ["--ca-cert=c", "--agent-cert=a", "--agent-key=k"];
        let with = |extra: &str| {
            let mut v = base.to_vec();
            v.push(extra);
            parse(&v)
        };
        assert!(parse(&["--ca-cert=c", "--agent-cert=a"]).is_err());
        assert!(parse(&["--agent-cert=a", "--agent-key=k"]).is_err());
        assert!(with("--sync-interval-cap=100ms").is_err());
        assert!(with("--agent-identifiers=zone=a").is_err());
        assert!(with("--sync-interval=10").is_err());
        assert!(with("--unknown-flag=1").is_err());
        assert!(with("--agent-identifiers=host=n1&default-route=true").is_ok());
        assert!(
            with("--cert-dir=/var/lib/spoke").is_err(),
            "--cert-dir with --agent-cert"
        );
        assert!(with("--proxy-server-host=,").is_err());
        assert!(with("--count-server-leases").is_ok());
        assert!(parse(&[
            "--ca-cert=c",
            "--cert-dir=/d",
            "--count-server-leases",
            "--lease-label-selector=a in (b"
        ])
        .is_err());
    }

    #[test]
    fn several_server_hosts() {
        let base = ["--ca-cert=c", "--agent-cert=a", "--agent-key=k"];
        let hosts = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v).expect("valid").proxy_server_host
        };
        assert_eq!(hosts(&[]), ["127.0.0.1"], "upstream's default");
        assert_eq!(hosts(&["--proxy-server-host=lb.example"]), ["lb.example"]);
        assert_eq!(
            hosts(&[
                "--proxy-server-host=a,b",
                "--proxy-server-host=c",
                "--proxy-server-host=a"
            ]),
            ["a", "b", "c"],
            "comma lists and repeats add up; duplicates go"
        );
        assert_eq!(hosts(&["--proxy-server-host", "s1, s2"]), ["s1", "s2"]);
        let o = parse(&[
            "--ca-cert=c",
            "--agent-cert=a",
            "--agent-key=k",
            "--proxy-server-port=8091",
            "--proxy-server-host=a,b:9000,[::1]:9001,[fd00::2],fd00::3",
        ])
        .expect("valid");
        assert_eq!(
            o.server_addresses(),
            [
                ("a".to_string(), 8091),
                ("b".to_string(), 9000),
                ("::1".to_string(), 9001),
                ("fd00::2".to_string(), 8091),
                ("fd00::3".to_string(), 8091)
            ]
        );
        for bad in ["a:0", "a:x", "[::1", ":80", "[::1]x"] {
            assert!(
                parse(&[
                    "--ca-cert=c",
                    "--agent-cert=a",
                    "--agent-key=k",
                    &format!("--proxy-server-host={bad}")
                ])
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn deprecated_lease_label_is_the_selector() {
        let o = parse(&[
            "--ca-cert=c",
            "--agent-cert=a",
            "--agent-key=k",
            "--count-server-leases",
            "--lease-label=app=x",
        ])
        .expect("valid");
        assert_eq!(o.lease_label_selector, "app=x");
    }
}
