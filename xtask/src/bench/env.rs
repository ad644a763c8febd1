//! The machine: packages the bench needs, limits, and what the report says about the host.
use anyhow::{bail, Context, Result};
use std::process::Command;

/// Debian packages of the baselines and namespace plumbing.
pub const PACKAGES: &[&str] = &[
    "openssh-server",
    "openssh-client",
    "stunnel4",
    "nftables",
    "iproute2",
    "procps",
];

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Facts for the report header.
pub struct Host {
    pub cpu: String,
    pub cpus: usize,
    pub mem_gib: f64,
    pub kernel: String,
    pub os: String,
    pub commit: String,
    pub short_commit: String,
    pub dirty: bool,
    pub rustc: String,
    pub date: String,
    pub stamp: String,
    pub loadavg: String,
}

pub fn host(root: &std::path::Path) -> Host {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "HEAD"]);
    let short = git(&["rev-parse", "--short=8", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    Host {
        cpu,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        mem_gib: mem_kib / (1024.0 * 1024.0),
        kernel: cmd_out("uname", &["-srvm"]),
        os,
        commit: if commit.is_empty() {
            "unknown".into()
        } else {
            commit
        },
        short_commit: if short.is_empty() {
            "nocommit".into()
        } else {
            short
        },
        dirty,
        rustc: cmd_out("rustc", &["--version"]),
        date: cmd_out("date", &["-u", "+%Y-%m-%d"]),
        stamp: cmd_out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        loadavg: loadavg(),
    }
}

/// Whether an executable is on PATH (or an absolute path exists).
pub fn which(prog: &str) -> Option<std::path::PathBuf> {
    if prog.starts_with('/') {
        let p = std::path::PathBuf::from(prog);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// Runs a command to completion, failing with its stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// /proc/loadavg's first three fields (other work on the machine skews timings).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
