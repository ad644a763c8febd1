//! Pinning the bench and the processes it measures to one CPU. On this kind of VM a halted vCPU
//! woken by the other one costs tens of µs, which every multi-process relay pays alike and
//! which swamps a route's own cost per round trip; on one CPU a wake-up is a context switch.
use anyhow::{bail, Result};

/// While this lives, every thread of this process and of `pids` runs on one CPU (and so does
/// every process started meanwhile, by inheritance). Restores the previous affinity on drop.
pub struct OneCpu {
    before: libc::cpu_set_t,
    pids: Vec<u32>,
}

impl OneCpu {
    pub fn pin(cpu: usize, pids: &[u32]) -> Result<OneCpu> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
        let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        if unsafe { libc::sched_getaffinity(0, size, &mut before) } != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        // SAFETY: as above; CPU_SET writes inside the set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::CPU_SET(cpu, &mut one) };
        let me = std::process::id();
        for pid in std::iter::once(me).chain(pids.iter().copied()) {
            set_threads(pid, &one)?;
        }
        Ok(OneCpu {
            before,
            pids: pids.to_vec(),
        })
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        let me = std::process::id();
        for pid in std::iter::once(me).chain(self.pids.iter().copied()) {
            let _ = set_threads(pid, &self.before);
        }
    }
}

/// Sets the affinity of every thread of `pid`.
fn set_threads(pid: u32, set: &libc::cpu_set_t) -> Result<()> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // SAFETY: `set` is a valid cpu_set_t; a thread that exited meanwhile just fails.
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) };
    }
    Ok(())
}
