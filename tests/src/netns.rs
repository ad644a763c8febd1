//! Network namespaces for the tests that shape traffic (nftables rules, veth links, the eBPF
//! data path): one type, [`NetNs`], and one way in, `setns(2)` on a thread of the test
//! process or in a child just before it execs.
//!
//! Everything lives in namespaces made here; nothing is added to the root namespace. A
//! namespace is deleted when its owner drops (also on panic), and leftovers of killed test
//! processes are removed whenever a new one is made.

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context};

/// Prefix of every namespace made here: `spoke-test-<pid>-<n>-<role>`.
const PREFIX: &str = "spoke-test";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether a test needing root (and `tools` on the PATH) may run: otherwise panics in a CI
/// run (see [`crate::in_ci`]), or prints a visible `SKIP:` line and returns false. `what` says
/// what the test needs root for.
pub fn require_root(test: &str, what: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else {
        let missing: Vec<&str> = tools
            .iter()
            .copied()
            .filter(|t| which(t).is_none())
            .collect();
        (!missing.is_empty())
            .then(|| format!("{} missing (run `cargo xtask setup`)", missing.join("/")))
    };
    let Some(problem) = problem else {
        return true;
    };
    let why = format!("{test} needs {what}: {problem}");
    if crate::in_ci() {
        panic!("{why}, and this is a CI run: refusing to skip");
    }
    println!("SKIP: {why}");
    eprintln!("SKIP: {why}");
    false
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Runs a command, failing with its stderr; returns its stdout.
pub fn run(cmd: &[&str]) -> anyhow::Result<String> {
    let (prog, args) = cmd.split_first().context("empty command")?;
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into the network namespace open as `fd` (namespaces are per
/// thread). Only a syscall, so it is also safe between fork and exec.
fn setns(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns on an open namespace fd changes only the calling thread's network namespace.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A named network namespace with `lo` up; deleted when its owner drops.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// False for a handle made by [`NetNs::named`]: someone else deletes it.
    owned: bool,
}

impl NetNs {
    /// Makes `spoke-test-<pid>-<n>-<role>` and brings its loopback up (after deleting
    /// leftovers of killed test processes).
    pub fn create(role: &str) -> anyhow::Result<NetNs> {
        remove_stale();
        let name = format!(
            "{PREFIX}-{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name])?;
        let ns = NetNs { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle to namespace `name` for entering it only; dropping it deletes nothing.
    pub fn named(name: &str) -> NetNs {
        NetNs {
            name: name.to_string(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        run(&cmd)
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = vec!["ip", "netns", "exec", &self.name];
        cmd.extend_from_slice(args);
        run(&cmd)
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Drops SYNs to 127.0.0.1:`port` leaving the namespace's loopback: a destination that
    /// neither answers nor refuses, so a dial to it hangs until its timeout.
    pub fn drop_syns_to(&self, port: u16) -> anyhow::Result<()> {
        self.nft(&format!(
            "table inet spoke_e2e {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  \
             ip daddr 127.0.0.1 tcp dport {port} tcp flags & (syn | ack) == syn drop\n }}\n}}\n"
        ))
    }

    fn open(&self) -> anyhow::Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("open {path}"))
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> anyhow::Result<()> {
        let f = self.open()?;
        setns(f.as_raw_fd()).with_context(|| format!("setns {}", self.name))
    }

    /// A command that runs inside the namespace. Unlike `ip netns exec`, this does not remount
    /// /sys, so the cgroup2 mount stays visible (as for an agent on the host network).
    pub fn command(&self, program: impl AsRef<OsStr>) -> anyhow::Result<Command> {
        use std::os::unix::process::CommandExt;
        let f = self.open()?;
        let mut cmd = Command::new(program);
        // SAFETY: only setns (a bare syscall) runs between fork and exec; the fd is owned by
        // the closure, which lives as long as the Command.
        unsafe {
            cmd.pre_exec(move || setns(f.as_raw_fd()));
        }
        Ok(cmd)
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns (borrows
    /// allowed). Sockets it creates and processes it spawns live in the namespace; panics
    /// propagate.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()
                    .unwrap_or_else(|e| panic!("enter namespace: {e:#}"));
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Like [`NetNs::run`], with the future `make` returns run to completion on a fresh
    /// current-thread tokio runtime inside the namespace.
    pub fn block_on<Fut: Future>(&self, make: impl FnOnce() -> Fut + Send) -> Fut::Output
    where
        Fut::Output: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(make())
        })
    }

    /// Runs `f` on a detached thread inside the namespace (for servers that outlive the
    /// call); the handle yields an error if the thread could not enter.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let ns = NetNs::named(&self.name);
        std::thread::spawn(move || {
            ns.enter()?;
            Ok(f())
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = run(&["ip", "netns", "del", &self.name]) {
            eprintln!(
                "WARNING: could not delete network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// Joins two namespaces with a veth pair and addresses each end (`addr/len`, IPv4 or IPv6,
/// any number). Deleting either namespace removes the pair.
pub fn veth(
    a: &NetNs,
    a_if: &str,
    a_addrs: &[&str],
    b: &NetNs,
    b_if: &str,
    b_addrs: &[&str],
) -> anyhow::Result<()> {
    // Made inside `a`, so the root namespace never sees the pair.
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args)?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Deletes namespaces of test processes that no longer exist.
fn remove_stale() {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale network namespace {name} (pid {pid} is gone)");
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}
