//! Where each wake-up of a process lands, and how long the woken thread waits to run. On this
//! kind of VM a halted vCPU woken by the other one takes tens of µs to run anything, against a
//! few µs for a thread woken on the CPU that woke it. So a route's unscheduled round trip is
//! mostly its count of wake-ups that land on the other, idle, vCPU: that count is the
//! kernel's placement of the route's processes, not their work.
//!
//! Traced with `perf record -a` on `sched:sched_waking` and `sched:sched_switch` over the
//! counting run: a wake-up is a thread's `sched_waking` followed by the switch that runs it.
//! It landed on the other, idle vCPU when that switch is on another CPU than the waking and
//! replaces the idle task.
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A process's wake-ups over the trace: counts, and µs from waking to running.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Landing {
    pub wakeups: f64,
    /// Those run on another CPU than the waker's, which was idle (halted).
    pub to_idle_other: f64,
    pub wait_us: f64,
    pub to_idle_other_wait_us: f64,
}

/// Sums landings; any untraced one makes the sum untraced.
impl std::iter::Sum<Landing> for Landing {
    fn sum<I: Iterator<Item = Landing>>(iter: I) -> Landing {
        iter.fold(Landing::default(), |a, b| Landing {
            wakeups: a.wakeups + b.wakeups,
            to_idle_other: a.to_idle_other + b.to_idle_other,
            wait_us: a.wait_us + b.wait_us,
            to_idle_other_wait_us: a.to_idle_other_wait_us + b.to_idle_other_wait_us,
        })
    }
}

impl Landing {
    pub fn per(self, n: f64) -> Landing {
        Landing {
            wakeups: self.wakeups / n,
            to_idle_other: self.to_idle_other / n,
            wait_us: self.wait_us / n,
            to_idle_other_wait_us: self.to_idle_other_wait_us / n,
        }
    }
}

/// A system-wide trace of wake-ups and switches, running.
pub struct Tracing {
    perf: Child,
    data: PathBuf,
}

impl Tracing {
    pub fn start(work: &Path) -> Result<Tracing> {
        let data = work.join("perf-sched.data");
        let perf = Command::new("perf")
            .args(["record", "-a", "-q"])
            .args(["-e", "sched:sched_waking", "-e", "sched:sched_switch"])
            .arg("-o")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("perf record (for where wake-ups land)")?;
        Ok(Tracing { perf, data })
    }

    /// Stops tracing; one [`Landing`] per group of process ids (a process and, for sshd, its
    /// children), over the whole trace.
    pub fn stop(mut self, groups: &[Vec<u32>]) -> Result<Vec<Landing>> {
        // SAFETY: kill has no memory effects; the pid is our own child's.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        self.perf.wait()?;
        let out = Command::new("perf")
            .args(["script", "-F", "pid,tid,cpu,time,event,trace", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        let _ = std::fs::remove_file(&self.data);
        anyhow::ensure!(out.status.success(), "perf script failed");
        Ok(landings(&String::from_utf8_lossy(&out.stdout), groups))
    }
}

/// One `perf script -F pid,tid,cpu,time,event,trace` line of ours.
enum Event {
    /// `tid` is being woken by a thread on `cpu`.
    Waking { tid: u32 },
    /// The thread `prev` (of process `pid`) leaves `cpu` for `next`.
    Switch { pid: u32, prev: u32, next: u32 },
}

fn parse(line: &str) -> Option<(u32, f64, Event)> {
    // "  1234/1236  [001] 33534.929837: sched:sched_waking: comm=x pid=15 prio=120 target_cpu=000"
    let (head, rest) = line.split_once("] ")?;
    let (ids, cpu) = head.split_once('[')?;
    let pid: u32 = ids.trim().split('/').next()?.parse().ok()?;
    let cpu: u32 = cpu.trim().parse().ok()?;
    let (time, rest) = rest.split_once(": ")?;
    let time: f64 = time.trim().parse().ok()?;
    let (event, fields) = rest.split_once(": ")?;
    let field = |name: &str| -> Option<u32> {
        fields
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let ev = match event {
        "sched:sched_waking" => Event::Waking { tid: field("pid")? },
        "sched:sched_switch" => Event::Switch {
            pid,
            prev: field("prev_pid")?,
            next: field("next_pid")?,
        },
        _ => return None,
    };
    Some((cpu, time, ev))
}

/// Each group's wake-ups in a trace (see the module's doc).
fn landings(script: &str, groups: &[Vec<u32>]) -> Vec<Landing> {
    // A thread's process is known from its switches out: the sample's task is then `prev`.
    let mut process: HashMap<u32, u32> = HashMap::new();
    let events: Vec<(u32, f64, Event)> = script.lines().filter_map(parse).collect();
    for (_, _, ev) in &events {
        if let Event::Switch { pid, prev, .. } = ev {
            process.insert(*prev, *pid);
        }
    }
    let group_of = |tid: u32| {
        let pid = process.get(&tid)?;
        groups.iter().position(|g| g.contains(pid))
    };
    let mut out = vec![Landing::default(); groups.len()];
    let mut woken: HashMap<u32, (u32, f64)> = HashMap::new();
    for &(cpu, time, ref ev) in &events {
        match *ev {
            Event::Waking { tid } => {
                woken.insert(tid, (cpu, time));
            }
            Event::Switch { prev, next, .. } => {
                // Woken while still running: it never waited.
                woken.remove(&prev);
                let Some((waker_cpu, at)) = woken.remove(&next) else {
                    continue;
                };
                let Some(g) = group_of(next) else {
                    continue;
                };
                let wait = (time - at).max(0.0) * 1e6;
                let l = &mut out[g];
                l.wakeups += 1.0;
                l.wait_us += wait;
                if waker_cpu != cpu && prev == 0 {
                    l.to_idle_other += 1.0;
                    l.to_idle_other_wait_us += wait;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wakeup_on_the_other_idle_cpu_is_told_from_one_on_the_wakers() {
        let script = "\
  100/100   [000] 10.000000: sched:sched_switch: prev_comm=a prev_pid=100 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120
  200/201   [001] 10.000001: sched:sched_switch: prev_comm=b prev_pid=201 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
    0/0     [001] 10.000010: sched:sched_waking: comm=a pid=100 prio=120 target_cpu=000
    0/0     [000] 10.000040: sched:sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=a next_pid=100 next_prio=120
  100/100   [000] 10.000050: sched:sched_waking: comm=b pid=201 prio=120 target_cpu=001
  100/100   [000] 10.000053: sched:sched_switch: prev_comm=a prev_pid=100 prev_prio=120 prev_state=S ==> next_comm=b next_pid=201 next_prio=120
  200/201   [000] 10.000060: sched:sched_waking: comm=b pid=201 prio=120 target_cpu=000
  200/201   [000] 10.000070: sched:sched_switch: prev_comm=b prev_pid=201 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120
";
        let l = landings(script, &[vec![100], vec![200], vec![300]]);
        // a: woken from CPU 1 onto idle CPU 0, 30 µs later.
        assert_eq!(l[0].wakeups, 1.0);
        assert_eq!(l[0].to_idle_other, 1.0);
        assert!((l[0].to_idle_other_wait_us - 30.0).abs() < 0.01);
        // b: woken on the waker's CPU, 3 µs; then "woken" while running, which is no wait.
        assert_eq!(l[1].wakeups, 1.0);
        assert_eq!(l[1].to_idle_other, 0.0);
        assert!((l[1].wait_us - 3.0).abs() < 0.01);
        assert_eq!(l[2], Landing::default());
    }
}
