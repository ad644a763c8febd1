//! eBPF toolchain setup and build (owned by the eBPF work).
use std::path::PathBuf;

pub fn setup() -> anyhow::Result<()> {
    anyhow::bail!("not yet implemented")
}

pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    anyhow::bail!("not yet implemented")
}
