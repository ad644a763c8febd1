//! A cgroup v2 directory for the eBPF tests: the agent's programs attach to it, so the test
//! process and its children join it.
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

/// Prefix of the cgroups made here: `spoke-ebpf-<pid>-<n>`.
const PREFIX: &str = "spoke-ebpf";

static NEXT: AtomicUsize = AtomicUsize::new(0);

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
