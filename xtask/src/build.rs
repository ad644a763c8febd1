//! The release build shared by `bench` and `demo`: the eBPF object (best effort; the agent
//! embeds it when present), then spoke-server, spoke-agent and the full xtask in one cargo
//! invocation, so features unify once and no crate compiles twice.
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::Command;

/// Set by the light xtask on the full one it starts: `target/release` is fresh.
pub const PREBUILT_ENV: &str = "SPOKE_XTASK_PREBUILT";

/// Builds everything in release (unless the light xtask just did) and returns
/// `target/release`.
pub fn release() -> Result<PathBuf> {
    let root = crate::workspace_root();
    let dir = root.join("target/release");
    if std::env::var_os(PREBUILT_ENV).is_some() {
        return Ok(dir);
    }
    println!("== release build: the eBPF object, spoke-server, spoke-agent and the full xtask");
    if let Err(e) = crate::ebpf::build_ebpf() {
        println!("(eBPF object not built: {e:#}; the agent runs without its fast path)");
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "spoke-server",
            "-p",
            "spoke-agent",
        ])
        .args(["-p", "xtask", "--features", "xtask/runner"])
        .status()?;
    if !status.success() {
        bail!("release build failed");
    }
    Ok(dir)
}

/// Light xtask: builds the full one in release and runs it with the same arguments.
#[cfg(not(feature = "runner"))]
pub fn hand_over() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let dir = release()?;
    let err = Command::new(dir.join("xtask"))
        .args(std::env::args_os().skip(1))
        .env(PREBUILT_ENV, "1")
        .exec();
    bail!("cannot run {}: {err}", dir.join("xtask").display())
}
