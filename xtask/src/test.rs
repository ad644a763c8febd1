//! `cargo xtask test`: installs what the tests need, then runs every test: lints, unit and
//! end-to-end tests (real processes, TLS, sockets, namespaces, kernel programs) and the
//! offline validation of deploy/, then a bounded run of every fuzz target.
use anyhow::{bail, Result};
use std::process::Command;

fn step(name: &str, cmd: &mut Command) -> bool {
    println!("\n[test] {name}: {cmd:?}");
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    println!("[test] {name}: {}", if ok { "ok" } else { "FAILED" });
    ok
}

/// The test run's fuzzing: a fixed number of runs from a fixed seed on every machine (not a
/// time, nor a local corpus), enough to replay the seeds and regressions and explore a little
/// (2–40 s a target), with a time limit that only catches a hang.
pub const FUZZ_BUDGET: crate::fuzz::Budget = crate::fuzz::Budget::Fixed {
    runs: 20_000,
    limit_seconds: 300,
};

/// `PATH` with the sbin directories, where `ip`, `nft` and `bpftool` live: the tests run them,
/// and a runner's `PATH` may leave sbin out.
fn path_with_sbin() -> std::ffi::OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> = std::env::split_paths(&current).collect();
    for sbin in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d.as_os_str() == sbin) {
            dirs.push(sbin.into());
        }
    }
    std::env::join_paths(dirs).unwrap_or(current)
}

pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    crate::ebpf::setup()?;
    crate::ebpf::build_ebpf()?;
    let path = path_with_sbin();
    let cargo = || {
        let mut c = Command::new(env!("CARGO"));
        c.current_dir(&root).env("PATH", &path);
        c
    };
    let mut failed = Vec::new();
    let mut check = |name: &'static str, cmd: &mut Command| {
        if !step(name, cmd) {
            failed.push(name);
        }
    };
    check("fmt", cargo().args(["fmt", "--all", "--check"]));
    check(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    );
    check(
        "clippy (light xtask)",
        cargo().args([
            "clippy",
            "-p",
            "xtask",
            "--no-default-features",
            "--",
            "-D",
            "warnings",
        ]),
    );
    check("build", cargo().args(["build", "--workspace", "--bins"]));
    check(
        "cargo test",
        cargo().args(["test", "--workspace", "--no-fail-fast"]),
    );
    check(
        "deploy validation",
        Command::new("bash")
            .current_dir(&root)
            .arg("tests/deploy/validate.sh"),
    );
    // Bounded fuzzing of every target (SPOKE_FUZZ_SECONDS explores for that long instead).
    println!("\n[test] fuzz: {FUZZ_BUDGET:?} per target");
    match crate::fuzz::run(FUZZ_BUDGET) {
        Ok(()) => println!("[test] fuzz: ok"),
        Err(e) => {
            println!("[test] fuzz: FAILED: {e:#}");
            failed.push("fuzz");
        }
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    println!("\n[test] all passed");
    Ok(())
}
