//! Readings from /proc: CPU time and RSS of processes, system-wide softirq time, and
//! percentiles of samples.
use anyhow::{Context, Result};
use std::collections::HashMap;

/// Clock ticks per second of /proc/PID/stat times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of /proc/PID/stat after the `(comm)` field; index 0 is `state`.
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of `pid` (all its threads) in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let f = stat_fields(pid)?;
    // stat fields 14 (utime) and 15 (stime) are indices 11 and 12 after `state` (field 3).
    let u: u64 = f.get(11).context("no utime")?.parse()?;
    let s: u64 = f.get(12).context("no stime")?.parse()?;
    Ok((u + s) as f64 / clk_tck())
}

/// Nanoseconds `pid`'s threads have run (schedstat: exact, where utime and stime are
/// sampled at the clock tick).
pub fn run_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU seconds of `pid` and every living descendant (sshd forks a child per session).
pub fn tree_cpu_secs(pid: u32) -> f64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(f) = stat_fields(p) {
                if let Some(pp) = f.get(1).and_then(|x| x.parse::<u32>().ok()) {
                    children.entry(pp).or_default().push(p);
                }
            }
        }
    }
    let mut total = 0.0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        total += cpu_secs(p).unwrap_or(0.0);
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    total
}

/// VmRSS of `pid` in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: u64 = line.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok(kib * 1024)
}

/// The first line of /proc/stat, in seconds: (softirq, busy = [`machine_work`]'s work).
pub fn system_cpu() -> Result<(f64, f64)> {
    let v = proc_stat_cpu()?;
    Ok((v[6], work(&v)))
}

/// Seconds the machine's CPUs spent working (user, nice, system, irq, softirq): neither
/// idle, nor waiting, nor taken by the hypervisor (steal).
pub fn machine_work() -> Result<f64> {
    Ok(work(&proc_stat_cpu()?))
}

fn work(v: &[f64]) -> f64 {
    v[0] + v[1] + v[2] + v[5] + v[6]
}

/// The times of /proc/stat's `cpu` line (user, nice, system, idle, iowait, irq, softirq,
/// steal, ...), in seconds.
fn proc_stat_cpu() -> Result<Vec<f64>> {
    let s = std::fs::read_to_string("/proc/stat")?;
    parse_cpu_line(s.lines().next().context("empty /proc/stat")?)
}

fn parse_cpu_line(line: &str) -> Result<Vec<f64>> {
    let t = clk_tck();
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse::<u64>().ok())
        .map(|x| x as f64 / t)
        .collect();
    anyhow::ensure!(v.len() >= 8, "short cpu line in /proc/stat: {line:?}");
    Ok(v)
}

/// NET_RX softirq count summed over CPUs (/proc/softirqs).
pub fn net_rx_softirqs() -> u64 {
    std::fs::read_to_string("/proc/softirqs")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.trim_start().starts_with("NET_RX:"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(1)
                        .filter_map(|x| x.parse::<u64>().ok())
                        .sum()
                })
        })
        .unwrap_or(0)
}

/// Nearest-rank percentile `p` (0..=100) of sorted samples.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts samples for [`pct`].
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// CPU seconds of named processes, snapshotted before a measured section.
pub struct CpuProbe {
    procs: Vec<(String, u32, bool, f64)>,
}

impl CpuProbe {
    /// `(label, pid, whole_tree)`.
    pub fn start(procs: &[(&str, u32, bool)]) -> Self {
        let read = |pid: u32, tree: bool| {
            if tree {
                tree_cpu_secs(pid)
            } else {
                cpu_secs(pid).unwrap_or(0.0)
            }
        };
        Self {
            procs: procs
                .iter()
                .map(|(n, p, t)| (n.to_string(), *p, *t, read(*p, *t)))
                .collect(),
        }
    }

    /// CPU seconds each process used since `start`.
    pub fn stop(&self) -> Vec<(String, f64)> {
        self.procs
            .iter()
            .map(|(n, p, t, before)| {
                let now = if *t {
                    tree_cpu_secs(*p)
                } else {
                    cpu_secs(*p).unwrap_or(*before)
                };
                (n.clone(), (now - before).max(0.0))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work counts user, nice, system, irq and softirq; idle, iowait and steal are not work.
    #[test]
    fn machine_work_leaves_out_idle_iowait_and_steal() {
        let t = clk_tck();
        let v = parse_cpu_line("cpu  100 1 20 5000 7 3 4 900 0 0").expect("parse");
        assert!((work(&v) - 128.0 / t).abs() < 1e-9);
        assert!(parse_cpu_line("cpu 1 2 3").is_err());
    }
}
