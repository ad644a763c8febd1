//! `cargo xtask bench`: builds the release binaries, starts everything on this machine
//! (loopback and network namespaces it creates) and measures Spoke against baselines measured
//! in the same run: direct TCP, `ssh -L`, a stunnel TLS hop, a direct TCP connection over the
//! same emulated long fat link, `--ebpf=off`, an nftables rule. Scenarios run one after the
//! other (never two timing-sensitive things at once). Results go to
//! `bench/results/<date>-<commit>/` (`results.json`, `report.md`, SVG charts); a full run
//! also refreshes `BENCHMARKS.md`.
mod affinity;
mod baselines;
mod env;
pub mod io;
mod netns;
mod pki;
mod placement;
pub(crate) mod procs;
mod report;
mod scenarios;
pub(crate) mod stats;
mod svg;
mod wakeups;

use anyhow::{bail, Context, Result};
use report::Section;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const ALL: &[&str] = &[
    "bulk", "latency", "churn", "fanout", "fleet", "longfat", "ebpf", "xdp",
];

pub use crate::bench_args::BenchArgs;

/// Sizes of one run profile.
pub struct Size {
    pub bulk: u64,
    /// Rounds of the bulk scenario, every route once per round; each row reports the round
    /// of median throughput (one transfer moved by up to 45 % between runs on a busy host).
    pub bulk_rounds: usize,
    pub pings: usize,
    /// Times the latency scenario starts every route's processes ...
    pub latency_starts: usize,
    /// ... and rounds it runs on each start (unpinned, then as many pinned), every route in
    /// each round.
    pub latency_rounds: usize,
    pub churn: Duration,
    pub fanout: Vec<usize>,
    pub trickle: Duration,
    pub longfat: Duration,
    pub longfat_trials: usize,
    pub xdp: Duration,
    /// Alternating `--ebpf=off` / `--ebpf=on` rounds in the ebpf scenario (its floors compare
    /// the means: one pair of runs differs by more than the fast path changes, and on this
    /// VM one transfer's MiB/s moves by up to 30 % between rounds, download included, which
    /// the fast path does not touch; five rounds each halve the mean's spread of three).
    pub ebpf_rounds: usize,
    /// Fleet sizes (agents on one server).
    pub fleet: Vec<usize>,
    /// First connects in flight across the fleet.
    pub fleet_first_connects: usize,
    /// Sequential dials per strategy and fleet size (the full profile's 10,000 put 100 samples
    /// above the p99: with 2,000 its ratio moved by ±0.3 between runs).
    pub fleet_dials: usize,
    /// Window for the idle CPU reading.
    pub fleet_idle: Duration,
    /// Agents in the three-server HA run.
    pub fleet_ha: usize,
}

impl Size {
    fn of(a: &BenchArgs) -> Size {
        let mut s = Self::profile(a);
        if !a.fleet_agents.is_empty() {
            s.fleet = a.fleet_agents.clone();
        }
        s
    }

    fn profile(a: &BenchArgs) -> Size {
        if a.tiny {
            Size {
                bulk: 8 << 20,
                bulk_rounds: 1,
                pings: 300,
                latency_starts: 1,
                latency_rounds: 1,
                churn: Duration::from_millis(500),
                fanout: vec![50],
                trickle: Duration::from_millis(500),
                longfat: Duration::from_secs(1),
                longfat_trials: 1,
                xdp: Duration::from_millis(500),
                ebpf_rounds: 1,
                fleet: vec![20],
                fleet_first_connects: 500,
                fleet_dials: 20,
                fleet_idle: Duration::from_secs(1),
                fleet_ha: 10,
            }
        } else if a.quick {
            Size {
                bulk: 256 << 20,
                bulk_rounds: 3,
                pings: 5_000,
                latency_starts: 2,
                latency_rounds: 2,
                churn: Duration::from_secs(3),
                fanout: vec![1_000],
                trickle: Duration::from_secs(3),
                longfat: Duration::from_secs(8),
                longfat_trials: 1,
                xdp: Duration::from_secs(3),
                ebpf_rounds: 1,
                fleet: vec![1_000, 5_000],
                fleet_first_connects: 500,
                fleet_dials: 500,
                fleet_idle: Duration::from_secs(10),
                fleet_ha: 300,
            }
        } else {
            Size {
                bulk: 1 << 30,
                bulk_rounds: 5,
                pings: 20_000,
                latency_starts: 5,
                latency_rounds: 2,
                churn: Duration::from_secs(8),
                fanout: vec![1_000, 10_000],
                trickle: Duration::from_secs(5),
                longfat: Duration::from_secs(15),
                longfat_trials: 2,
                xdp: Duration::from_secs(5),
                ebpf_rounds: 5,
                fleet: vec![1_000, 5_000, 10_000],
                fleet_first_connects: 500,
                fleet_dials: 10_000,
                fleet_idle: Duration::from_secs(30),
                fleet_ha: 1_000,
            }
        }
    }
}

/// What every scenario gets.
pub struct Ctx {
    pub bin: PathBuf,
    pub work: PathBuf,
    pub pki: pki::Pki,
    pub tls: io::Tls,
    pub size: Size,
    pub t0: Instant,
    /// /24 prefixes (e.g. `10.213.0`) for the long fat link and the XDP flood.
    pub nets: [String; 2],
    /// An upstream-compatible server binary to measure beside spoke-server (fleet).
    pub server_bin: Option<PathBuf>,
}

impl Ctx {
    pub fn say(&self, msg: &str) {
        let t = self.t0.elapsed().as_secs();
        println!("[bench {:02}:{:02}] {msg}", t / 60, t % 60);
    }
}

fn say0(t0: Instant, msg: &str) {
    let t = t0.elapsed().as_secs();
    println!("[bench {:02}:{:02}] {msg}", t / 60, t % 60);
}

/// Where the hand-written analysis of `BENCHMARKS.md` starts: a full run keeps it.
const ANALYSIS_MARKER: &str = "<!-- analysis: kept by cargo xtask bench -->";

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(addr) = &args.serve_backend {
        return io::serve_backend_process(addr);
    }
    let t0 = Instant::now();
    // The bench's gRPC client holds up to a stream window (8 MiB) of received frames, each a
    // slice of a 256 KiB read block, so its reads keep needing fresh blocks. With glibc's
    // defaults those went back to the kernel as they were freed and came back as fresh zeroed
    // pages: 39 page faults per MiB received over UDS and 162 over mTLS, up to a third of the
    // client's CPU, on the two cores Spoke's own processes run on. Go's allocator, in the
    // kube-apiserver the client stands in for, keeps freed memory for minutes. The bench keeps
    // it as Spoke's processes do; the processes it starts set their own.
    spoke_process::memory::keep_freed_heap();
    let root = crate::workspace_root();
    let mut chosen: Vec<String> = args
        .scenarios
        .iter()
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    if chosen.is_empty() {
        chosen = ALL.iter().map(|s| s.to_string()).collect();
    }
    for s in &chosen {
        if !ALL.contains(&s.as_str()) {
            bail!("unknown scenario {s:?}; known: {}", ALL.join(", "));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask bench needs root (network namespaces, nftables, sshd, eBPF)");
    }
    let profile = if args.tiny {
        "tiny"
    } else if args.quick {
        "quick"
    } else {
        "full"
    };
    let mut cmdline = String::from("cargo xtask bench");
    for a in std::env::args().skip(2) {
        cmdline.push(' ');
        cmdline.push_str(&a);
    }
    say0(t0, &format!("{profile} run of: {}", chosen.join(", ")));
    netns::remove_stale();
    if !args.no_install {
        crate::ebpf::ensure_apt("bench", env::PACKAGES)?;
    }
    spoke_tests::ports::raise_nofile_limit();
    let nofile = spoke_tests::ports::nofile_limit();
    say0(
        t0,
        &format!("RLIMIT_NOFILE raised to {nofile} (inherited by every process started)"),
    );

    let bin = match &args.bin_dir {
        Some(d) => d.clone(),
        None => crate::build::release()?,
    };
    for b in ["spoke-server", "spoke-agent"] {
        if !bin.join(b).is_file() {
            bail!("{} not found", bin.join(b).display());
        }
    }

    let host = env::host(&root);
    // Before the runtime starts any thread: every thread and process of the run inherits it.
    let net = netns::BenchNet::enter(&args.congestion_control)?;
    say0(
        t0,
        &format!(
            "running in network namespace of its own, TCP congestion control {} (the host's: {}, default qdisc {})",
            net.congestion_control, net.host_congestion_control, net.host_qdisc
        ),
    );
    let work = std::env::temp_dir().join(format!("spoke-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let _cleanup = RemoveDir(work.clone());
    let net_a = netns::free_net(&[])?;
    let net_b = netns::free_net(&[&net_a])?;
    let sans = [
        "localhost".to_string(),
        "127.0.0.1".into(),
        format!("{net_a}.1"),
        format!("{net_b}.1"),
    ];
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let pki = pki::Pki::generate(&work, &sans)?;
    let ctx = Ctx {
        bin,
        work: work.clone(),
        tls: io::Tls::new(&pki)?,
        pki,
        size: Size::of(&args),
        t0,
        nets: [net_a, net_b],
        server_bin: args.server_bin.clone(),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut sections: Vec<Section> = Vec::new();
    for s in &chosen {
        ctx.say(&format!("== scenario {s}"));
        let sec = rt.block_on(scenarios::run(&ctx, s));
        if let Some(why) = &sec.not_run {
            ctx.say(&format!("   {s}: not run: {why}"));
        }
        for f in sec.floors.iter().filter(|f| !f.floor.starts_with('(')) {
            ctx.say(&format!(
                "   {s}: {} = {} (floor {}): {}",
                f.what,
                f.value,
                f.floor,
                match f.met {
                    Some(true) => "met",
                    Some(false) => "NOT MET",
                    None => "not evaluated",
                }
            ));
        }
        sections.push(sec);
        // Let sockets in TIME_WAIT and exiting processes settle before the next scenario.
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(rt);

    let out = match &args.out {
        Some(o) => o.clone(),
        None => {
            let base = root.join("bench/results");
            let name = format!(
                "{}-{}{}",
                host.date,
                host.short_commit,
                if args.quick {
                    "-quick"
                } else if args.tiny {
                    "-tiny"
                } else {
                    ""
                }
            );
            let mut dir = base.join(&name);
            let mut i = 2;
            while dir.exists() {
                dir = base.join(format!("{name}-{i}"));
                i += 1;
            }
            dir
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let commands = procs::COMMANDS
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let info = report::RunInfo {
        host: &host,
        profile,
        command: &cmdline,
        duration_s: t0.elapsed().as_secs_f64(),
        nofile,
        commands: &commands,
        net: &net,
    };
    for sec in &sections {
        for (file, _, svg) in &sec.charts {
            std::fs::write(out.join(file), svg)?;
        }
    }
    std::fs::write(
        out.join("report.md"),
        report::markdown(&info, &sections, ""),
    )?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&report::json(&info, &sections))?,
    )?;
    if profile == "full" && args.out.is_none() {
        let rel = out
            .strip_prefix(&root)
            .unwrap_or(&out)
            .display()
            .to_string();
        let mut md = report::markdown(&info, &sections, &format!("{rel}/"));
        // The written analysis below the marker outlives the generated figures.
        let old = std::fs::read_to_string(root.join("BENCHMARKS.md")).unwrap_or_default();
        if let Some(at) = old.find(ANALYSIS_MARKER) {
            md.push('\n');
            md.push_str(&old[at..]);
        }
        std::fs::write(root.join("BENCHMARKS.md"), md)?;
        say0(t0, "BENCHMARKS.md updated");
    }
    say0(
        t0,
        &format!(
            "done in {:.0} s: {}",
            t0.elapsed().as_secs_f64(),
            out.join("report.md").display()
        ),
    );
    Ok(())
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
