//! Wake-ups and system calls per round trip, per process: what each relay does for one
//! 64-byte exchange, Spoke beside ssh and stunnel. Counted in a run of their own after the
//! timed one, so that counting never touches the latency figures.
//!
//! Wake-ups are voluntary context switches (a thread went to sleep and was woken), summed
//! over every thread from /proc. System calls are counted by `perf stat` on the
//! `raw_syscalls:sys_enter` tracepoint (std's sockets use recv/send, which /proc/PID/io's
//! syscr/syscw do not count); without perf they are left out.
use anyhow::Result;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A process to watch: its label, its pid, and whether its children count too (sshd forks a
/// child per session).
pub type Watched<'a> = (&'a str, u32, bool);

/// One process's counts over the probe, per round trip.
#[derive(Clone, Debug)]
pub struct PerRound {
    pub process: String,
    pub wakeups: f64,
    pub syscalls: Option<f64>,
}

struct Probe {
    label: String,
    pids: Vec<u32>,
    switches: u64,
    perf: Option<(Child, PathBuf)>,
}

/// Counting started on some processes.
pub struct Counting(Vec<Probe>);

/// `pid` and, with `tree`, its descendants.
fn pids_of(pid: u32, tree: bool) -> Vec<u32> {
    if !tree {
        return vec![pid];
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            if let Some(pp) = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|x| x.parse::<u32>().ok())
            {
                children.entry(pp).or_default().push(p);
            }
        }
    }
    let (mut all, mut stack) = (Vec::new(), vec![pid]);
    while let Some(p) = stack.pop() {
        all.push(p);
        stack.extend(children.get(&p).into_iter().flatten());
    }
    all
}

/// Voluntary context switches of every thread of `pids`.
fn switches(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn start_perf(pids: &[u32], out: &Path) -> Option<(Child, PathBuf)> {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-o"])
        .arg(out)
        .args(["-p", &list.join(",")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some((child, out.to_path_buf()))
}

/// The count `perf stat -x,` wrote (its first field), once it has exited.
fn perf_count(mut child: Child, out: &Path) -> Option<u64> {
    // SAFETY: kill has no memory effects; the pid is our own child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait().ok()?;
    let text = std::fs::read_to_string(out).ok()?;
    text.lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next())
        .and_then(|v| v.trim().parse().ok())
}

impl Counting {
    /// Starts counting for `procs`; perf's output files go to `work`.
    pub fn start(work: &Path, procs: &[Watched<'_>]) -> Counting {
        let probes = procs
            .iter()
            .enumerate()
            .map(|(i, (label, pid, tree))| {
                let pids = pids_of(*pid, *tree);
                let out = work.join(format!("perf-syscalls-{i}.txt"));
                Probe {
                    label: label.to_string(),
                    switches: switches(&pids),
                    perf: start_perf(&pids, &out),
                    pids,
                }
            })
            .collect();
        // perf attaches asynchronously: give it a moment before the counted work.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Counting(probes)
    }

    /// Stops counting; counts per round trip for `rounds` round trips.
    pub fn stop(self, rounds: usize) -> Result<Vec<PerRound>> {
        let n = rounds.max(1) as f64;
        Ok(self
            .0
            .into_iter()
            .map(|p| {
                let wakeups = switches(&p.pids).saturating_sub(p.switches) as f64 / n;
                let syscalls = p
                    .perf
                    .and_then(|(child, out)| perf_count(child, &out))
                    .map(|c| c as f64 / n);
                PerRound {
                    process: p.label,
                    wakeups,
                    syscalls,
                }
            })
            .collect())
    }
}
