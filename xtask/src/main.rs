//! Project tasks that cargo alone cannot do: toolchain setup, the eBPF build, the demo,
//! the full test run and the benchmarks.
use clap::{Parser, Subcommand};

mod ebpf;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => ebpf::setup(),
        Cmd::BuildEbpf => ebpf::build_ebpf().map(|p| println!("{}", p.display())),
    }
}
