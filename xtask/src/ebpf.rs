//! eBPF toolchain setup and build.
//!
//! The kernel programs are built with Debian's `rustc-web` (whose matching std source ships as
//! `rust-web-src`, which rustup cannot download here) and `bpf-linker` built against the same
//! LLVM major. See shared/ebpf-toolchain.md for why each piece is needed.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

/// Everything the builds and the test suite need from apt.
const APT_PACKAGES: &[&str] = &[
    // eBPF toolchain: a compiler able to build `core` for bpfel-unknown-none, its std source,
    // and LLVM 22 for bpf-linker.
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // Test suite.
    "bpftool",
    "iproute2",
    "curl",
    "nftables",
    "openssh-client",
    "libcap2-bin",
    "util-linux",
    // tests/conformance.rs: a real grpc-go client (tests/real-clients/goclient), built offline
    // in GOPATH mode from Debian's Go sources.
    "golang-go",
    "golang-google-grpc-dev",
    "golang-golang-x-net-dev",
    "golang-github-golang-protobuf-1-3-dev",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const EBPF_TARGET: &str = "bpfel-unknown-none";
const EBPF_BIN: &str = "spoke-agent-ebpf";

fn step(msg: &str) {
    println!("[setup] {msg}");
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of the built object; the agent's build script looks for it here.
pub fn object_path() -> PathBuf {
    workspace_root()
        .join("agent-ebpf/target")
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_BIN)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// A command whose environment carries none of the outer cargo/rustup/rustc variables (they
/// would make the inner build use the rustup toolchain), and whose PATH finds bpf-linker.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let toolchain_var =
            key.starts_with("CARGO") || key.starts_with("RUSTUP") || key.starts_with("RUSTC");
        if toolchain_var && key != "CARGO_HOME" && key != "RUSTUP_HOME" {
            cmd.env_remove(key);
        }
    }
    let mut path = OsString::from(cargo_home().join("bin"));
    if let Some(old) = env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    cmd.env("PATH", path);
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd);
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

fn privileged(program: &str) -> anyhow::Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if Command::new("sudo")
        .arg("-n")
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
    {
        let mut cmd = Command::new("sudo");
        cmd.arg("-n")
            .arg("env")
            .arg("DEBIAN_FRONTEND=noninteractive")
            .arg(program);
        return Ok(cmd);
    }
    bail!("installing apt packages needs root (or password-less sudo)")
}

fn bpf_linker_ok() -> bool {
    clean_command("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

/// Installs the apt packages and bpf-linker that builds and tests need. Idempotent: only what
/// is missing is installed.
pub fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        step(&format!("apt: all {} packages present", APT_PACKAGES.len()));
    } else {
        step(&format!("apt: installing {}", missing.join(" ")));
        run(privileged("apt-get")?
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-q", "update"]))?;
        run(privileged("apt-get")?
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
        step("apt: done");
    }

    if bpf_linker_ok() {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (about 3 minutes on 2 cores)"
        ));
        // The rustup cargo on PATH builds bpf-linker (a normal host tool); LLVM_PREFIX is what
        // its build script reads (Debian ships no plain `llvm-config`).
        run(clean_command("cargo")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--locked"]))?;
        if !bpf_linker_ok() {
            bail!("bpf-linker installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION}");
        }
        step("bpf-linker: done");
    }

    report_kernel();
    step("ready: run `cargo xtask build-ebpf` to build the eBPF object");
    Ok(())
}

/// Prints the kernel facts the eBPF features depend on (informational only).
fn report_kernel() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cgroup2 = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next(), f.next(), f.next());
            (fstype == Some("cgroup2")).then(|| dir.unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "not mounted".into());
    step(&format!("kernel {}, cgroup2 at {cgroup2}", release.trim()));
}

/// Builds the kernel programs (release, with BTF) and returns the object's path.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    if !Path::new(DEBIAN_RUSTC).exists() || !Path::new(DEBIAN_CARGO).exists() {
        bail!("{DEBIAN_RUSTC} or {DEBIAN_CARGO} missing: run `cargo xtask setup` first");
    }
    if !bpf_linker_ok() {
        bail!("bpf-linker {BPF_LINKER_VERSION} not found: run `cargo xtask setup` first");
    }
    let dir = workspace_root().join("agent-ebpf");
    run(clean_command(DEBIAN_CARGO)
        .current_dir(&dir)
        .env("RUSTC", DEBIAN_RUSTC)
        // Debian's stable rustc needs this for -Z build-std (core for the BPF target).
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "build",
            "--release",
            "--target",
            EBPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(dir.join("target")))?;
    let obj = object_path();
    if !obj.exists() {
        bail!("build finished but {} is missing", obj.display());
    }
    Ok(obj)
}
