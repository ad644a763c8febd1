//! Throw-away network namespaces for tests that need to shape traffic (e.g. drop SYNs with
//! nftables). Only loopback exists inside; nothing is ever added to the root namespace. The
//! namespace is deleted when the guard drops.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether a privileged test may run. Not root: panics in a CI run (`CI` set, see `in_ci`), otherwise prints a visible
/// `SKIP:` line and returns false.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let why = format!("{test} needs root (network namespaces, nftables)");
    if crate::in_ci() {
        panic!("{why}, and this is a CI run: refusing to skip");
    }
    println!("SKIP: {why}");
    eprintln!("SKIP: {why}");
    false
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Deletes `spoke-e2e-<pid>-*` namespaces whose test process no longer exists.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let pid = name
            .strip_prefix("spoke-e2e-")
            .and_then(|rest| rest.split('-').next());
        if let Some(pid) = pid.filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            eprintln!("removing stale network namespace {name} (pid {pid} is gone)");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A network namespace with `lo` up.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `spoke-e2e-<pid>-<n>` and brings its loopback up (after deleting leftovers of
    /// killed test processes).
    pub fn create() -> anyhow::Result<Self> {
        remove_stale();
        let name = format!(
            "spoke-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Namespace name.
    pub fn name(&self) -> &str {
        &self.name
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
            .expect("stdin")
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Runs `f` on a fresh thread that has joined this namespace: sockets it creates and
    /// processes it spawns live in the namespace. Panics in `f` propagate.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        });
        handle
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "WARNING: could not delete network namespace {}: {e}",
                self.name
            );
        }
    }
}
