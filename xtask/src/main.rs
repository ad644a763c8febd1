//! Project tasks that cargo alone cannot do: toolchain setup, the eBPF build, the demo,
//! the full test run and the benchmarks.
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

mod bench;
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
    /// Run server, agent and a kubelet-like backend here and send requests through them.
    Demo {
        /// Exit after the first round instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Install test dependencies and run every test.
    Test,
    /// Run every fuzz target for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the benchmarks here and write bench/results/<date>-<commit>/.
    Bench(bench::BenchArgs),
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
        Cmd::Demo { once } => {
            // The demo runs the agent with --ebpf=auto: it uses the fast path when it can.
            if ebpf::build_ebpf().is_err() {
                println!("(eBPF object not built: run `cargo xtask setup` for the fast path; the demo goes on without it)");
            }
            demo::run(once)
        }
        Cmd::Test => test::run(),
        Cmd::Fuzz { seconds } => fuzz::run(seconds),
        Cmd::Bench(a) => bench::run(a),
    }
}
