//! spoke-server flags: upstream proxy-server's names and defaults, plus Spoke's own.
use anyhow::{bail, Result};
use clap::ArgAction::Set;
use clap::Parser;
use spoke_process::flags::{byte_size, go_duration, list, string_list};
use spoke_process::klog::KlogFlags;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Grpc,
    HttpConnect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Default,
    DestHost,
    DefaultRoute,
    /// Spoke's own: the agent with the fewest connections (upstream #15).
    LeastLoaded,
}

impl Strategy {
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Default => "default",
            Strategy::DestHost => "destHost",
            Strategy::DefaultRoute => "defaultRoute",
            Strategy::LeastLoaded => "leastLoaded",
        }
    }
}

fn strategies(s: &str) -> Result<Vec<Strategy>, String> {
    let list = string_list(s);
    if list.is_empty() {
        return Err("at least one proxy strategy is required".into());
    }
    list.iter()
        .map(|s| match s.as_str() {
            "default" => Ok(Strategy::Default),
            "destHost" => Ok(Strategy::DestHost),
            "defaultRoute" => Ok(Strategy::DefaultRoute),
            "leastLoaded" => Ok(Strategy::LeastLoaded),
            other => Err(format!(
                "unknown proxy strategy {other:?} (known: default, destHost, defaultRoute, leastLoaded)"
            )),
        })
        .collect()
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "spoke-server",
    version,
    // As with Go's flag packages: a flag given twice takes its last value (manifests often
    // append an override instead of editing the original argument).
    args_override_self = true,
    about = "Konnectivity-compatible proxy server: accepts agents and kube-apiserver's egress frontends"
)]
pub struct Options {
    /// Frontend protocol: grpc or http-connect.
    #[arg(long, value_enum, default_value = "grpc")]
    pub mode: Mode,
    /// Unix socket for the frontend (then --server-port must be 0; plaintext).
    #[arg(long, default_value = "")]
    pub uds_name: String,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "true", default_missing_value = "true")]
    pub delete_existing_uds_file: bool,
    /// TCP port of the mTLS frontend.
    #[arg(long, default_value_t = 8090)]
    pub server_port: u16,
    #[arg(long, default_value = "")]
    pub server_bind_address: String,
    #[arg(long, default_value = "")]
    pub server_cert: String,
    #[arg(long, default_value = "")]
    pub server_key: String,
    /// CA for frontend client certificates (required with TCP).
    #[arg(long, default_value = "")]
    pub server_ca_cert: String,

    /// Port agents connect to.
    #[arg(long, default_value_t = 8091)]
    pub agent_port: u16,
    #[arg(long, default_value = "")]
    pub agent_bind_address: String,
    #[arg(long, default_value = "")]
    pub cluster_cert: String,
    #[arg(long, default_value = "")]
    pub cluster_key: String,
    /// CA for agent client certificates (enables mTLS on the agent port).
    #[arg(long, default_value = "")]
    pub cluster_ca_cert: String,

    /// /healthz, /readyz, /ready and /metrics.
    #[arg(long, default_value_t = 8092)]
    pub health_port: u16,
    #[arg(long, default_value = "")]
    pub health_bind_address: String,
    /// /metrics (legacy location) and the admin endpoints.
    #[arg(long, default_value_t = 8095)]
    pub admin_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,

    #[arg(long, value_parser = go_duration, default_value = "1h")]
    pub keepalive_time: Duration,
    #[arg(long, value_parser = go_duration, default_value = "1h")]
    pub frontend_keepalive_time: Duration,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub enable_profiling: bool,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub enable_contention_profiling: bool,

    /// Sent to agents as `serverID`; default: $PROXY_SERVER_ID or a random UUID.
    #[arg(long, env = "PROXY_SERVER_ID", default_value = "")]
    pub server_id: String,
    /// Number of servers behind the agents' address, sent as `serverCount`.
    #[arg(long, default_value_t = 1)]
    pub server_count: u32,

    #[arg(long, default_value = "")]
    pub agent_namespace: String,
    #[arg(long, default_value = "")]
    pub agent_service_account: String,
    #[arg(long, default_value = "")]
    pub authentication_audience: String,
    /// kubeconfig for the Kubernetes API (TokenReview, leases, CSR approval); empty: in-cluster.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    #[arg(long, default_value = "0")]
    pub kubeconfig_qps: f32,
    #[arg(long, default_value = "0")]
    pub kubeconfig_burst: u32,
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,

    /// Ordered agent selection: default, destHost, defaultRoute (upstream), leastLoaded (Spoke).
    #[arg(long, value_parser = strategies, default_value = "default")]
    pub proxy_strategies: std::vec::Vec<Strategy>,
    #[arg(long, value_parser = list, default_value = "")]
    pub cipher_suites: std::vec::Vec<String>,
    #[arg(long, default_value = "")]
    pub tls_min_version: String,
    /// Accepted for compatibility; Spoke bounds buffers in bytes (--max-connection-buffer-bytes).
    #[arg(long, default_value_t = 10)]
    pub xfr_channel_size: u32,
    /// Publish this server's Lease `konnectivity-proxy-server-<server-id>` in --lease-namespace
    /// (labels --lease-label, 30s duration, renewed every 15s) and delete expired leases with
    /// the same labels every 15s. Needs --kubeconfig or in-cluster credentials.
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub enable_lease_controller: bool,
    /// Namespace of the server leases (published and counted).
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Labels of this server's lease, `key=value[,key=value]`.
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label: String,
    /// Spoke: advertise the number of valid server leases (watched) as `serverCount` instead of
    /// --server-count (which stays the fallback until the first count).
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub count_server_leases: bool,
    /// Leases counted with --count-server-leases.
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label_selector: String,
    /// Spoke (hidden, for tests): lease duration; upstream's is 30s.
    #[arg(long, value_parser = go_duration, default_value = "30s", hide = true)]
    pub lease_duration: Duration,
    /// Spoke (hidden, for tests): lease renewal interval; upstream's is 15s.
    #[arg(long, value_parser = go_duration, default_value = "15s", hide = true)]
    pub lease_renew_interval: Duration,
    /// Spoke (hidden, for tests): expired-lease collection interval; upstream's is 15s.
    #[arg(long, value_parser = go_duration, default_value = "15s", hide = true)]
    pub lease_gc_interval: Duration,
    /// Spoke: approve agents' CertificateSigningRequests (see --agent-csr-*): only pending CSRs
    /// for --agent-csr-signer-name from the service account --agent-csr-namespace/
    /// --agent-csr-service-account, with subject CN=system:konnectivity-agent:<agent id>, an
    /// ECDSA P-256 key, client-auth usage, one pending CSR per agent. Others are left alone.
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub approve_agent_csrs: bool,
    /// Spoke: namespace of the agents' service account (--approve-agent-csrs).
    #[arg(long, default_value = "kube-system")]
    pub agent_csr_namespace: String,
    /// Spoke: the agents' service account; only its CSRs are approved.
    #[arg(long, default_value = "konnectivity-agent")]
    pub agent_csr_service_account: String,
    /// Spoke: signer of the agents' CSRs; its CA is what --cluster-ca-cert must trust.
    #[arg(long, default_value = "kubernetes.io/kube-apiserver-client")]
    pub agent_csr_signer_name: String,
    /// On SIGTERM, how long open connections may finish (0: stop at once).
    #[arg(long, value_parser = go_duration, default_value = "0")]
    pub graceful_shutdown_timeout: Duration,
    /// Bound on sending DIAL_REQ to an agent and waiting for its answer (0: off).
    #[arg(long, value_parser = go_duration, default_value = "0")]
    pub backend_dial_timeout: Duration,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true", hide = true)]
    pub warn_on_channel_limit: bool,

    /// Spoke: HTTP CONNECT request header read timeout (slowloris guard).
    #[arg(long, value_parser = go_duration, default_value = "60s")]
    pub frontend_header_timeout: Duration,
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
    /// Spoke: TLS handshakes each TLS listener (agent port, mTLS frontend) runs at once; in a
    /// reconnect storm the rest wait (bounded memory, open streams keep being served).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_tls_handshakes: u32,
    /// Spoke: accepted connections per TLS listener waiting for a handshake slot; past it the
    /// listener stops accepting and the kernel's accept queue (somaxconn) holds the rest.
    #[arg(long, default_value_t = 4096)]
    pub max_pending_accepts: u32,
    /// Spoke: most established tunnelled connections; new dials past it get 503.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,
    /// Spoke: most dials waiting for an agent's answer; new dials past it get 503.
    #[arg(long, default_value_t = 10_000)]
    pub max_pending_dials: usize,
    /// Spoke: bytes buffered across all connections before new dials are refused.
    #[arg(long, value_parser = byte_size, default_value = "1Gi")]
    pub max_buffered_bytes: usize,

    #[command(flatten)]
    pub klog: KlogFlags,
}

impl Options {
    /// Checks flag combinations as upstream does; each error is one actionable line.
    pub fn validate(&mut self) -> Result<()> {
        if self.server_id.is_empty() {
            self.server_id = uuid::Uuid::new_v4().to_string();
        }
        if self.server_count == 0 {
            bail!("--server-count must be at least 1");
        }
        if !self.uds_name.is_empty() {
            if self.server_port != 0 {
                bail!("--server-port must be 0 when --uds-name is set");
            }
            if !(self.server_cert.is_empty()
                && self.server_key.is_empty()
                && self.server_ca_cert.is_empty())
            {
                bail!("--server-cert, --server-key and --server-ca-cert cannot be used with --uds-name (the Unix socket is plaintext)");
            }
        } else {
            if !(1024..=49151).contains(&self.server_port) {
                bail!(
                    "--server-port {} must be within 1024-49151 (or use --uds-name)",
                    self.server_port
                );
            }
            if self.server_cert.is_empty() || self.server_key.is_empty() {
                bail!("--server-cert and --server-key are required for the TCP frontend");
            }
            if self.server_ca_cert.is_empty() {
                bail!("--server-ca-cert is required for the TCP frontend (clients must present certificates)");
            }
        }
        if self.cluster_cert.is_empty() || self.cluster_key.is_empty() {
            bail!("--cluster-cert and --cluster-key are required (the agent port always uses TLS)");
        }
        let auth = [
            &self.agent_namespace,
            &self.agent_service_account,
            &self.authentication_audience,
        ];
        let set = auth.iter().filter(|s| !s.is_empty()).count();
        if set != 0 && set != 3 {
            bail!("--agent-namespace, --agent-service-account and --authentication-audience must be set together");
        }
        if set == 3 && !self.cluster_ca_cert.is_empty() {
            bail!("--cluster-ca-cert (agent client certificates) and token authentication are mutually exclusive");
        }
        if self.agent_port == 0 || self.health_port == 0 {
            bail!("--agent-port and --health-port must be non-zero");
        }
        if self.enable_contention_profiling && !self.enable_profiling {
            bail!("--enable-contention-profiling requires --enable-profiling");
        }
        if self.enable_lease_controller {
            spoke_k8s::leases::parse_labels(&self.lease_label)
                .map_err(|e| anyhow::anyhow!("--lease-label {:?}: {e}", self.lease_label))?;
            if self.lease_duration.as_secs() == 0
                || self.lease_renew_interval.is_zero()
                || self.lease_gc_interval.is_zero()
            {
                bail!("--lease-duration must be at least 1s and the lease intervals positive");
            }
            if self.lease_renew_interval >= self.lease_duration {
                bail!("--lease-renew-interval must be shorter than --lease-duration");
            }
        }
        if self.count_server_leases {
            spoke_k8s::leases::check_selector_flag(&self.lease_label_selector)?;
        }
        if self.approve_agent_csrs
            && (self.agent_csr_namespace.is_empty()
                || self.agent_csr_service_account.is_empty()
                || self.agent_csr_signer_name.is_empty())
        {
            bail!("--approve-agent-csrs needs --agent-csr-namespace, --agent-csr-service-account and --agent-csr-signer-name");
        }
        Ok(())
    }

    pub fn token_auth(&self) -> bool {
        !self.agent_namespace.is_empty()
    }

    /// Whether anything needs a Kubernetes client.
    pub fn needs_kube(&self) -> bool {
        self.token_auth()
            || self.enable_lease_controller
            || self.count_server_leases
            || self.approve_agent_csrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options> {
        let mut o =
            Options::try_parse_from(std::iter::once("spoke-server").chain(args.iter().copied()))?;
        o.validate()?;
        Ok(o)
    }

    const CERTS: [&str; 2] = ["--cluster-cert=c", "--cluster-key=k"];

    #[test]
    fn a_repeated_flag_takes_its_last_value() {
        let o = parse(&[
            "--cluster-cert=c",
            "--cluster-key=k",
            "--uds-name=/tmp/s.sock",
            "--server-port=0",
            "--mode=grpc",
            "--mode=http-connect",
            "--proxy-strategies=default",
            "--proxy-strategies=destHost,default",
        ])
        .unwrap();
        assert_eq!(o.mode, Mode::HttpConnect);
        assert_eq!(o.proxy_strategies.len(), 2);
    }

    #[test]
    fn upstream_spellings_are_accepted() {
        let o = parse(&[
            "--uds-name=/tmp/s.sock",
            "--server-port=0",
            "--cluster-cert=c",
            "--cluster-key=k",
            "--keepalive-time=1h0m0s",
            "--proxy-strategies=destHost,default",
            "--cipher-suites=[]",
            "--delete-existing-uds-file",
            "--enable-profiling=false",
            "--v=5",
            "--logtostderr=true",
            "--kubeconfig=",
            "--lease-label=k8s-app=konnectivity-server",
        ])
        .unwrap();
        assert_eq!(
            o.proxy_strategies,
            vec![Strategy::DestHost, Strategy::Default]
        );
        assert_eq!(o.keepalive_time, Duration::from_secs(3600));
        assert!(o.delete_existing_uds_file);
        assert!(!o.server_id.is_empty());
    }

    #[test]
    fn invalid_combinations_are_refused() {
        assert!(parse(&["--uds-name=/s", "--cluster-cert=c", "--cluster-key=k"]).is_err()); // port 8090 with uds
        assert!(parse(&CERTS).is_err()); // TCP frontend without certs
        assert!(parse(&["--uds-name=/s", "--server-port=0"]).is_err()); // no cluster cert
        assert!(parse(&[
            "--uds-name=/s",
            "--server-port=0",
            "--cluster-cert=c",
            "--cluster-key=k",
            "--proxy-strategies=nearest"
        ])
        .is_err());
        assert!(parse(&[
            "--uds-name=/s",
            "--server-port=0",
            "--cluster-cert=c",
            "--cluster-key=k",
            "--agent-namespace=kube-system"
        ])
        .is_err());
        assert!(parse(&[
            "--uds-name=/s",
            "--server-port=0",
            "--cluster-cert=c",
            "--cluster-key=k",
            "--mode=socks"
        ])
        .is_err());
        assert!(parse(&[
            "--server-cert=a",
            "--server-key=b",
            "--server-ca-cert=c",
            "--server-port=80",
            "--cluster-cert=c",
            "--cluster-key=k"
        ])
        .is_err());
    }
}
