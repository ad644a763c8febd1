//! Bounded fuzzing: builds the libFuzzer targets in `fuzz/` and runs each for a few seconds.
//!
//! The build does what `cargo fuzz build --sanitizer none` does (SanitizerCoverage flags,
//! `--cfg fuzzing`, debug assertions, a `--target` so build scripts and proc macros stay
//! uninstrumented) with plain cargo, so it needs neither cargo-fuzz nor a nightly
//! toolchain. Without a sanitizer, libFuzzer still finds panics, aborts, timeouts and
//! out-of-memory; Rust's own checks stand in for ASan.
//!
//! Inputs: `fuzz/seeds/<target>` (committed seeds), `fuzz/regressions/<target>` (every
//! crash found so far, replayed first) and `fuzz/corpus/<target>` (what runs learn,
//! ignored by git). A crash is saved under `fuzz/artifacts/<target>/`; copy it into
//! `fuzz/regressions/<target>/` and into `tests/tests/fuzz_regressions.rs`.
//!
//! Two budgets. `cargo xtask fuzz` explores for a time per target, keeping what it learns
//! in the corpus. The test run (`cargo xtask test`, CI) is a fixed number of runs from a
//! fixed seed over the committed seeds and regressions only, so what it explores depends
//! neither on a local corpus nor on the machine's speed (hash-map order still varies the
//! coverage a little from run to run).
//!
//! `SPOKE_FUZZ_SECONDS` overrides the time per target (longer local runs);
//! `SPOKE_FUZZ_TARGET_DIR` moves the build out of `fuzz/target` (a cache that survives);
//! `SPOKE_FUZZ_STRICT=1` also checks the invariants of known, unfixed bugs.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Every fuzz target (`[[bin]]` of fuzz/Cargo.toml).
pub const TARGETS: &[&str] = &[
    "packets_server",
    "packets_agent",
    "http_connect",
    "http2",
    "hpack",
    "identifiers",
    "flags",
];

/// What cargo-fuzz passes to rustc for `--sanitizer none`.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV printed no host triple")
}

/// Builds every target; returns the directory holding the binaries.
pub fn build(fuzz_dir: &Path) -> Result<PathBuf> {
    let triple = host_triple()?;
    // SPOKE_FUZZ_TARGET_DIR: keep builds somewhere that outlives the clone (CI cache).
    let target_dir = std::env::var_os("SPOKE_FUZZ_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| fuzz_dir.join("target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(fuzz_dir)
        .args(["build", "--release", "--bins", "--target", &triple])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("running cargo build for fuzz/")?;
    if !status.success() {
        bail!("building the fuzz targets failed");
    }
    Ok(target_dir.join(triple).join("release"))
}

/// Result of one bounded run of one target.
pub struct Outcome {
    pub target: &'static str,
    pub executions: u64,
    pub seconds: f64,
    /// The crashing input libFuzzer saved, if the run failed.
    pub failure: Option<String>,
}

/// How long each target runs.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// Explore for this many seconds, growing the persistent corpus.
    Explore { seconds: u64 },
    /// Exactly this many runs from a fixed seed, from the committed inputs only; the time
    /// limit only guards against a hang.
    Fixed { runs: u64, limit_seconds: u64 },
}

fn run_target(
    fuzz_dir: &Path,
    bin_dir: &Path,
    target: &'static str,
    budget: Budget,
) -> Result<Outcome> {
    let dir = |kind: &str| fuzz_dir.join(kind).join(target);
    let (seeds, regressions, artifacts) = (dir("seeds"), dir("regressions"), dir("artifacts"));
    // New inputs go to the first directory: the untracked corpus, or, for a fixed budget, an
    // empty scratch one (what earlier runs learned would change the run).
    let (corpus, budget_args) = match budget {
        Budget::Explore { seconds } => (dir("corpus"), vec![format!("-max_total_time={seconds}")]),
        Budget::Fixed {
            runs,
            limit_seconds,
        } => {
            let scratch = bin_dir.join("fixed-corpus").join(target);
            let _ = std::fs::remove_dir_all(&scratch);
            (
                scratch,
                vec![
                    "-seed=1".to_string(),
                    format!("-runs={runs}"),
                    format!("-max_total_time={limit_seconds}"),
                ],
            )
        }
    };
    for d in [&corpus, &seeds, &regressions, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let started = Instant::now();
    let out = Command::new(bin_dir.join(target))
        .args(&budget_args)
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args([
            "-print_final_stats=1",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-max_len=8192",
        ])
        .args([&corpus, &seeds, &regressions])
        .current_dir(fuzz_dir)
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let executions = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let failure = (!out.status.success()).then(|| {
        let saved = log.lines().find_map(|l| {
            l.split_once("Test unit written to ")
                .map(|(_, p)| p.trim().to_string())
        });
        let panic = log
            .lines()
            .skip_while(|l| !l.contains("panicked at"))
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "{} ({})",
            saved.unwrap_or_else(|| "no input saved".into()),
            if panic.is_empty() {
                out.status.to_string()
            } else {
                panic
            }
        )
    });
    if failure.is_some() {
        let tail: Vec<_> = log.lines().rev().take(40).collect();
        for l in tail.into_iter().rev() {
            eprintln!("  {target}| {l}");
        }
    }
    Ok(Outcome {
        target,
        executions,
        seconds: started.elapsed().as_secs_f64(),
        failure,
    })
}

/// Builds and runs every fuzz target on `budget` (`SPOKE_FUZZ_SECONDS` turns any budget
/// into exploring for that long), printing executions per target; fails if any target found
/// a crash.
pub fn run(budget: Budget) -> Result<()> {
    let budget = match std::env::var("SPOKE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(seconds) => Budget::Explore {
            seconds: seconds.max(1),
        },
        None => budget,
    };
    let fuzz_dir = crate::workspace_root().join("fuzz");
    let started = Instant::now();
    let bin_dir = build(&fuzz_dir)?;
    let built = started.elapsed().as_secs_f64();
    println!("[fuzz] built {} targets in {built:.0}s", TARGETS.len());
    let mut failed = Vec::new();
    for target in TARGETS {
        let o = run_target(&fuzz_dir, &bin_dir, target, budget)?;
        println!(
            "[fuzz] {:<15} {:>10} executions in {:.0}s{}",
            o.target,
            o.executions,
            o.seconds,
            o.failure
                .as_deref()
                .map(|f| format!("  CRASH: {f}"))
                .unwrap_or_default()
        );
        if o.failure.is_some() {
            failed.push(o.target);
        }
    }
    println!(
        "[fuzz] total {:.0}s (build {built:.0}s)",
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("fuzz targets found crashes: {}", failed.join(", "));
    }
    Ok(())
}
