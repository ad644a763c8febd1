//! Network namespaces, veth links and a cgroup for the eBPF tests.
//!
//! Everything lives in namespaces this module creates; nothing is added to the root
//! namespace. Guards delete what they created on drop, including on panic, and stale
//! leftovers of killed test runs are removed at start.
//!
//! Threads of the test process enter a namespace with [`Netns::enter`] (network namespaces
//! are per thread), so test endpoints are plain std sockets; children are started with
//! `ip netns exec`.
use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{bail, Context};

/// Prefix of everything this module creates (namespaces, cgroups).
pub const PREFIX: &str = "spoke-ebpf";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether a test needing root and eBPF may run. Otherwise panics in a CI run (`CI` set, see `in_ci`), or prints a
/// visible `SKIP:` line and returns false.
pub fn require_root(test: &str, what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if which("bpftool").is_none() || which("ip").is_none() {
        Some("bpftool/ip missing (run `cargo xtask setup`)".to_string())
    } else {
        None
    };
    let Some(problem) = problem else {
        return true;
    };
    let why = format!("{test} needs {what}: {problem}");
    if spoke_tests::in_ci() {
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

/// Runs a command, failing with its stderr.
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

/// A named network namespace with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `spoke-ebpf-<pid>-<n>-<role>`.
    pub fn new(role: &str) -> anyhow::Result<Netns> {
        let name = format!(
            "{PREFIX}-{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        run(&cmd)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = vec!["ip", "netns", "exec", &self.name];
        cmd.extend_from_slice(args);
        run(&cmd)
    }

    /// A command that runs inside the namespace. Unlike `ip netns exec`, this does not remount
    /// /sys, so the cgroup2 mount stays visible (as for an agent on the host network).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        use std::os::unix::process::CommandExt;
        let f = fs::File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("open netns {}", self.name))?;
        let mut cmd = Command::new(program);
        // SAFETY: only setns (async-signal-safe) runs between fork and exec; the fd is
        // owned by the closure, which lives as long as the Command.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Moves the calling thread into the namespace (network namespaces are per thread).
    pub fn enter(&self) -> anyhow::Result<()> {
        let f = fs::File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("open netns {}", self.name))?;
        // SAFETY: valid namespace fd; only this thread changes namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            Netns { name: name.clone() }.enter_forgetting()?;
            Ok(f())
        })
    }

    fn enter_forgetting(self) -> anyhow::Result<()> {
        let r = self.enter();
        // A clone for entering only: the owner deletes the namespace.
        std::mem::forget(self);
        r
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Joins two namespaces with a veth pair and addresses each end (`addr/len`, IPv4 or IPv6,
/// any number). Deleting either namespace removes the pair.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> anyhow::Result<()> {
    // Created inside `a`, so the root namespace never sees the pair.
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

/// The cgroup2 mount point (found in /proc/mounts; not always /sys/fs/cgroup).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount")
}

/// A cgroup v2 directory for the test process and its children.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// Where the test process was before `enter`, to return there on drop.
    home: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2>/spoke-ebpf-<pid>-<n>`, first removing empty leftovers of earlier runs.
    pub fn new() -> anyhow::Result<Cgroup> {
        let root = cgroup2_root()?;
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(PREFIX) {
                    let _ = fs::remove_dir(e.path()); // fails (harmlessly) while in use
                }
            }
        }
        let path = root.join(format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/');
        let home = Some(root.join(rel)).filter(|p| p.is_dir()).unwrap_or(root);
        Ok(Cgroup { path, home })
    }

    /// Moves the whole calling process into this cgroup: sockets created from now on (and
    /// children) belong to it.
    pub fn enter(&self) -> anyhow::Result<()> {
        fs::write(self.path.join("cgroup.procs"), "0").context("join cgroup")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Move every member back so the directory can go.
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = fs::write(self.home.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// Deletes namespaces left behind by earlier, killed runs of these tests.
pub fn remove_stale_namespaces() {
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
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}
