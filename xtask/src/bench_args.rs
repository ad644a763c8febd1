//! `cargo xtask bench` options (parsed by the light xtask too, before it hands over).
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Short run (256 MiB bulk, 1,000-connection fanout, shorter timed phases); under 10 minutes.
    #[arg(long)]
    pub quick: bool,
    /// A few MiB and seconds per scenario: checks that the harness works (used by the tests).
    #[arg(long)]
    pub tiny: bool,
    /// Scenario(s) to run (repeatable or comma-separated): bulk, latency, churn, fanout,
    /// fleet, longfat, ebpf, xdp. Default: all.
    #[arg(long = "scenario", value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// Use spoke-server/spoke-agent from this directory instead of building release binaries.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// An upstream-compatible server binary (e.g. upstream's proxy-server) that the fleet
    /// scenario measures beside spoke-server in the same run.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Fleet sizes (agents on one server) instead of the profile's, e.g. `300` or `1000,10000`.
    #[arg(long, value_delimiter = ',')]
    pub fleet_agents: Vec<usize>,
    /// Results directory (default: bench/results/<date>-<commit>[-quick]).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not install missing apt packages (baselines whose tools are missing are not run).
    #[arg(long)]
    pub no_install: bool,
    /// TCP congestion control in the bench's own network namespace, where every route runs
    /// (Spoke and its baselines alike): a name from
    /// /proc/sys/net/ipv4/tcp_available_congestion_control, or `host` for the host's setting.
    /// The default is the kernel's own default, cubic.
    #[arg(long, default_value = "cubic")]
    pub congestion_control: String,
    /// Internal: serve the bench backend on ADDR in this process until stdin closes (lets the
    /// fanout scenario spread its file descriptors over two processes).
    #[arg(long, hide = true)]
    pub serve_backend: Option<String>,
}
