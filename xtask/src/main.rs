//! Project tasks that cargo alone cannot do: toolchain setup, the eBPF build, the demo,
//! the full test run and the benchmarks.
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[cfg(feature = "runner")]
mod bench;
mod bench_args;
mod build;
#[cfg(feature = "runner")]
mod demo;
mod ebpf;
mod fuzz;
mod test;

#[derive(Parser)]
#[command(name = "xtask", about = "Spoke project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need (apt packages, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object (release, with BTF).
    BuildEbpf,
    /// Run server, agent and a kubelet-like backend here and send requests through them; sets
    /// up the agent's eBPF fast path first (toolchain, object) and shows what it saves.
    Demo {
        /// Exit after the first round instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Install test dependencies and run every test.
    Test,
    /// Explore with every fuzz target for a bounded time, growing fuzz/corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Instead, the test run's fixed budget (what CI runs, run for run).
        #[arg(long)]
        ci: bool,
    },
    /// Run the benchmarks here and write bench/results/<date>-<commit>/.
    Bench(bench_args::BenchArgs),
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => ebpf::setup(),
        Cmd::BuildEbpf => ebpf::build_ebpf().map(|p| println!("{}", p.display())),
        Cmd::Test => test::run(),
        Cmd::Fuzz { seconds, ci } => fuzz::run(if ci {
            test::FUZZ_BUDGET
        } else {
            fuzz::Budget::Explore { seconds }
        }),
        #[cfg(feature = "runner")]
        Cmd::Demo { once } => demo::run(once),
        #[cfg(feature = "runner")]
        Cmd::Bench(a) => bench::run(a),
        // The light xtask (`cargo xtask`) hands these over to the full one.
        #[cfg(not(feature = "runner"))]
        Cmd::Demo { .. } => build::hand_over(true),
        #[cfg(not(feature = "runner"))]
        Cmd::Bench(_) => build::hand_over(false),
    }
}
