//! Wake-ups, system calls and CPU time per round trip, per process: what each relay does for
//! one 64-byte exchange, Spoke beside ssh and stunnel. Counted in a run of their own after the
//! timed one, so that counting never touches the latency figures.
//!
//! Both come from `perf stat` on tracepoints, which follows threads a process starts and keeps
//! the counts of threads that end (stunnel runs a thread per connection): context switches
//! (`sched:sched_switch`, a thread going to sleep to be woken again, or preempted) and system
//! calls (`raw_syscalls:sys_enter`; std's sockets use recv/send, which /proc/PID/io's
//! syscr/syscw do not count), CPU time (`task-clock`, user and kernel) and page faults
//! (`page-faults`: pages the kernel maps in on first touch, most of them zeroed first).
//! Without perf the table says so.
use super::placement::Landing;
use anyhow::{Context, Result};
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
    pub switches: f64,
    pub syscalls: f64,
    /// CPU time, user and kernel, in µs.
    pub cpu_us: f64,
    /// Page faults (mostly fresh heap pages the kernel zeroes first).
    pub faults: f64,
    /// Where its wake-ups landed, when traced (see [`super::placement`]).
    pub landing: Option<Landing>,
}

struct Probe {
    label: String,
    /// The process and, for a tree, its descendants.
    pids: Vec<u32>,
    perf: Child,
    out: PathBuf,
}

/// Counting started on some processes.
pub struct Counting(Vec<Probe>);

/// `pid` and, with `tree`, its descendants.
pub fn pids_of(pid: u32, tree: bool) -> Vec<u32> {
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

const EVENTS: [&str; 4] = [
    "sched:sched_switch",
    "raw_syscalls:sys_enter",
    "task-clock",
    "page-faults",
];

fn start_perf(pids: &[u32], out: &Path) -> Result<Child> {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    Command::new("perf")
        .args(["stat", "-x", ","])
        .args(EVENTS.iter().flat_map(|e| ["-e", e]))
        .arg("-o")
        .arg(out)
        .args(["-p", &list.join(",")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf stat (for wake-ups, system calls and CPU time)")
}

/// The counts `perf stat -x,` wrote for [`EVENTS`] (task-clock in ms), once it has exited.
fn perf_counts(mut child: Child, out: &Path) -> Result<[f64; 4]> {
    // SAFETY: kill has no memory effects; the pid is our own child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait()?;
    let text = std::fs::read_to_string(out).with_context(|| format!("read {}", out.display()))?;
    let count = |event: &str| -> Result<f64> {
        text.lines()
            .find(|l| l.split(',').nth(2).is_some_and(|e| e == event))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {event} count from perf stat: {text:?}"))
    };
    Ok([
        count(EVENTS[0])?,
        count(EVENTS[1])?,
        count(EVENTS[2])?,
        count(EVENTS[3])?,
    ])
}

impl Counting {
    /// Starts counting for `procs`; perf's output files go to `work`.
    pub fn start(work: &Path, procs: &[Watched<'_>]) -> Result<Counting> {
        let mut probes = Vec::new();
        for (i, (label, pid, tree)) in procs.iter().enumerate() {
            let out = work.join(format!("perf-counts-{i}.txt"));
            let pids = pids_of(*pid, *tree);
            probes.push(Probe {
                label: label.to_string(),
                perf: start_perf(&pids, &out)?,
                pids,
                out,
            });
        }
        // perf attaches asynchronously: give it a moment before the counted work.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Counting(probes))
    }

    /// The process ids each watched process stands for, in the order given to `start`.
    pub fn groups(&self) -> Vec<Vec<u32>> {
        self.0.iter().map(|p| p.pids.clone()).collect()
    }

    /// Stops counting; counts per round trip for `rounds` round trips.
    pub fn stop(self, rounds: usize) -> Result<Vec<PerRound>> {
        let n = rounds.max(1) as f64;
        self.0
            .into_iter()
            .map(|p| {
                let [switches, syscalls, cpu_ms, faults] = perf_counts(p.perf, &p.out)?;
                Ok(PerRound {
                    process: p.label,
                    switches: switches / n,
                    syscalls: syscalls / n,
                    cpu_us: cpu_ms * 1e3 / n,
                    faults: faults / n,
                    landing: None,
                })
            })
            .collect()
    }
}
