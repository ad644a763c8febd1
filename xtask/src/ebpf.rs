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
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// The eBPF toolchain from apt (what the demo needs): a compiler able to build `core` for
/// bpfel-unknown-none, its std source, and LLVM 22 for bpf-linker.
const TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// What the test suite needs from apt besides the toolchain.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "curl",
    "nftables",
    "openssh-client",
    "libcap2-bin",
    "util-linux",
    // tests/ebpf.rs: a process that joins a cgroup, then execs a listener.
    "python3",
    // libfuzzer-sys builds libFuzzer (C++) for the fuzz step.
    "g++",
    // tests/conformance.rs: a real grpc-go client (tests/real-clients/goclient), built offline
    // in GOPATH mode from Debian's Go sources.
    "golang-go",
    "golang-google-grpc-dev",
    "golang-golang-x-net-dev",
    "golang-github-golang-protobuf-1-3-dev",
];

/// A fresh machine may be running its first unattended upgrade: wait for the dpkg lock.
pub const APT_LOCK_WAIT: &str = "DPkg::Lock::Timeout=600";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const EBPF_TARGET: &str = "bpfel-unknown-none";
const EBPF_BIN: &str = "spoke-agent-ebpf";

fn step(msg: &str) {
    println!("[setup] {msg}");
}

/// "2 min 35 s", "48 s", "0.4 s".
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{s:.0} s")
    } else {
        format!("{} min {:02} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// Runs one slow step: says what it does and how long it should take, then how long it took.
pub fn timed<T>(
    what: &str,
    estimate: &str,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    step(&format!("{what} ({estimate})…"));
    let t = Instant::now();
    let r = f();
    match &r {
        Ok(_) => step(&format!("  done in {}", human(t.elapsed()))),
        Err(_) => step(&format!("  failed after {}", human(t.elapsed()))),
    }
    r
}

/// Rough seconds `apt-get install` takes for `missing` on a fresh Debian 12 machine (2 cores):
/// the Rust and LLVM packages dominate.
fn apt_estimate(missing: &[&str]) -> u64 {
    let rust = missing
        .iter()
        .any(|p| p.starts_with("rust") || *p == "cargo-web");
    let llvm = missing
        .iter()
        .any(|p| p.starts_with("llvm") || p.starts_with("libpolly"));
    let others = missing
        .iter()
        .filter(|p| !(p.starts_with("rust") || p.starts_with("llvm") || p.starts_with("libpolly")))
        .count() as u64;
    10 + if rust { 25 } else { 0 } + if llvm { 20 } else { 0 } + 2 * others
}

fn about(secs: u64) -> String {
    if secs < 90 {
        format!("about {secs} s")
    } else {
        format!("about {} min", (secs + 30) / 60)
    }
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
    ensure_apt("test suite", TEST_PACKAGES)?;
    ensure_toolchain()?;
    report_kernel();
    step("ready: run `cargo xtask build-ebpf` to build the eBPF object");
    Ok(())
}

/// The toolchain's apt packages and bpf-linker, each step announced with an estimate and
/// timed; what is present is only checked (a second or so in all).
pub fn ensure_toolchain() -> anyhow::Result<()> {
    ensure_apt("eBPF toolchain", TOOLCHAIN_PACKAGES)?;
    if bpf_linker_ok() {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
    } else {
        timed(
            &format!("installing bpf-linker {BPF_LINKER_VERSION}, built against LLVM 22"),
            "about 3 min on 2 cores",
            || {
                // The rustup cargo on PATH builds bpf-linker (a normal host tool); LLVM_PREFIX
                // is what its build script reads (Debian ships no plain `llvm-config`).
                run(clean_command("cargo")
                    .env("LLVM_PREFIX", LLVM_PREFIX)
                    .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                    .args(["--no-default-features", "--features", "llvm-22", "--locked"]))?;
                if !bpf_linker_ok() {
                    bail!("bpf-linker installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION}");
                }
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// Installs whichever of `packages` are missing.
pub fn ensure_apt(what: &str, packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        step(&format!(
            "apt ({what}): all {} packages present",
            packages.len()
        ));
    } else {
        step(&format!(
            "apt ({what}): {} of {} packages missing: {}",
            missing.len(),
            packages.len(),
            missing.join(" ")
        ));
        // Fails early, with the reason, when neither root nor password-less sudo is there.
        privileged("apt-get")?;
        timed("apt-get update", "about 10 s", || {
            run(privileged("apt-get")?
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["-q", "-o", APT_LOCK_WAIT, "update"]))
        })?;
        timed(
            &format!("apt-get install ({} packages)", missing.len()),
            &format!("{} on 2 cores", about(apt_estimate(&missing))),
            || {
                run(privileged("apt-get")?
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["install", "-y", "-q", "--no-install-recommends"])
                    .args(["-o", APT_LOCK_WAIT])
                    .args(&missing))
            },
        )?;
    }
    Ok(())
}

/// What the demo needs for the agent's fast path, set up here when missing: root, a cgroup2
/// mount, the toolchain and the eBPF object (which the agent embeds at build time, so this
/// runs before the release build). Returns why the fast path cannot run, if it cannot; each
/// step says what it does, how long it should take and how long it took.
pub fn prepare_for_demo() -> Result<PathBuf, String> {
    let (release, cgroup2) = kernel_facts();
    step(&format!(
        "kernel {release}, cgroup2 at {}, {}",
        cgroup2.as_deref().unwrap_or("(not mounted)"),
        if is_root() {
            "running as root"
        } else {
            "not root"
        }
    ));
    if !is_root() {
        return Err(
            "not running as root: installing the eBPF toolchain and loading the \
                    agent's programs (CAP_BPF, CAP_NET_ADMIN) need root"
                .into(),
        );
    }
    if cgroup2.is_none() {
        return Err(
            "no cgroup2 mount in /proc/mounts: the fast path's sock_ops program attaches to a \
             cgroup v2 directory"
                .into(),
        );
    }
    ensure_toolchain().map_err(|e| format!("eBPF toolchain setup failed: {e:#}"))?;
    let estimate = if object_path().exists() {
        "under 2 s when up to date, a few seconds after a change"
    } else {
        "first build compiles `core` for BPF: about 1.5 min on 2 cores"
    };
    timed("building the eBPF object", estimate, build_ebpf)
        .map_err(|e| format!("eBPF object build failed: {e:#}"))
}
/// Prints the kernel facts the eBPF features depend on (informational only).
fn report_kernel() {
    let (release, cgroup2) = kernel_facts();
    step(&format!(
        "kernel {release}, cgroup2 at {}",
        cgroup2.as_deref().unwrap_or("not mounted")
    ));
}

/// The kernel release and where cgroup2 is mounted, if it is.
fn kernel_facts() -> (String, Option<String>) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cgroup2 = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next(), f.next(), f.next());
            (fstype == Some("cgroup2")).then(|| dir.unwrap_or("?").to_string())
        });
    (release.trim().to_string(), cgroup2)
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
