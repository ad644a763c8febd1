//! The release build shared by `bench` and `demo`: the eBPF object (the agent embeds it when
//! present), then spoke-server, spoke-agent and the full xtask in one cargo invocation, so
//! features unify once and no crate compiles twice. `demo` first sets up what the fast path
//! needs (toolchain, object); `bench` builds the object best effort.
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Set by the light xtask on the full one it starts: `target/release` is fresh.
pub const PREBUILT_ENV: &str = "SPOKE_XTASK_PREBUILT";

/// Set by the light xtask on the full one for `demo`: why the eBPF fast path cannot run
/// (absent when it was set up).
pub const DEMO_EBPF_OFF_ENV: &str = "SPOKE_DEMO_EBPF_OFF";

/// Builds everything in release (unless the light xtask just did) and returns
/// `target/release`.
pub fn release() -> Result<PathBuf> {
    if std::env::var_os(PREBUILT_ENV).is_some() {
        return Ok(release_dir());
    }
    if let Err(e) = crate::ebpf::build_ebpf() {
        println!("(eBPF object not built: {e:#}; the agent runs without its fast path)");
    }
    cargo_release()
}

/// The demo's build: the eBPF fast path's needs set up first (see
/// [`crate::ebpf::prepare_for_demo`]), then the release build. Returns `target/release` and
/// why the fast path cannot run, if it cannot.
pub fn demo_release() -> Result<(PathBuf, Option<String>)> {
    if std::env::var_os(PREBUILT_ENV).is_some() {
        let off = std::env::var(DEMO_EBPF_OFF_ENV).ok();
        return Ok((release_dir(), off));
    }
    println!("== eBPF fast path: toolchain and kernel object (set up here when missing)");
    let off = crate::ebpf::prepare_for_demo().err();
    if let Some(why) = &off {
        println!("   eBPF fast path unavailable: {why}");
        println!("   the demo runs the agent in userspace (same tunnel, no sockmap shortcut)");
    }
    Ok((cargo_release()?, off))
}

fn release_dir() -> PathBuf {
    crate::workspace_root().join("target/release")
}

fn cargo_release() -> Result<PathBuf> {
    let root = crate::workspace_root();
    let dir = release_dir();
    let fresh = !dir.join("spoke-agent").exists();
    println!(
        "== release build: spoke-server, spoke-agent and the full xtask ({})",
        if fresh {
            "first build: 5 to 10 min on 2 cores"
        } else {
            "seconds when up to date"
        }
    );
    let t = Instant::now();
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `cargo xtask` runs this under `cargo run`, which sets the xtask package's variables;
    // build scripts that watch them (ring's, through `cc`) would then see a change against a
    // plain `cargo build --release` and rebuild half the tree every time one follows the other.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "OUT_DIR"
        {
            cargo.env_remove(key);
        }
    }
    let status = cargo
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
    println!(
        "   release build done in {}",
        crate::ebpf::human(t.elapsed())
    );
    Ok(dir)
}

/// Light xtask: builds the full one in release and runs it with the same arguments (`demo`
/// sets up the eBPF fast path's needs first).
#[cfg(not(feature = "runner"))]
pub fn hand_over(demo: bool) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let (dir, ebpf_off) = if demo {
        demo_release()?
    } else {
        (release()?, None)
    };
    let mut cmd = Command::new(dir.join("xtask"));
    cmd.args(std::env::args_os().skip(1)).env(PREBUILT_ENV, "1");
    match ebpf_off {
        Some(why) => cmd.env(DEMO_EBPF_OFF_ENV, why),
        None => cmd.env_remove(DEMO_EBPF_OFF_ENV),
    };
    let err = cmd.exec();
    bail!("cannot run {}: {err}", dir.join("xtask").display())
}
