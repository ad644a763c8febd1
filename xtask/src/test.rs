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

/// Time per fuzz target in the test run: enough to replay the seeds and regressions and
/// explore a little, small enough for CI's budget.
const FUZZ_SECONDS: u64 = 20;

pub fn run() -> Result<()> {
    let root = crate::workspace_root();
    crate::ebpf::setup()?;
    crate::ebpf::build_ebpf()?;
    let cargo = || {
        let mut c = Command::new(env!("CARGO"));
        c.current_dir(&root);
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
    // Bounded fuzzing of every target (SPOKE_FUZZ_SECONDS overrides the time per target).
    println!("\n[test] fuzz: {FUZZ_SECONDS} s per target");
    match crate::fuzz::run(FUZZ_SECONDS) {
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
