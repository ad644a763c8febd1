//! Returning freed heap to the kernel after bursts. glibc keeps freed chunks in its arenas,
//! so a process that once held 1,000 connections would keep their memory resident forever
//! (the "RSS never goes down" complaint about upstream). A thread checks every second and
//! trims once the process has had a quiet second: after a burst (a reconnect storm's
//! handshakes) RSS is back at its baseline within a second or two, while a busy process,
//! which reuses its free heap at once, is trimmed only now and then.
use std::time::Duration;

/// How often the trimmer looks. A look costs a clock read, and `mallinfo2` when quiet.
const INTERVAL: Duration = Duration::from_secs(1);
/// A second in which the process used more CPU than this is busy: trimming then would only
/// have it fault the pages in again (a relay's buffers in a bulk transfer).
const BUSY_CPU: Duration = Duration::from_millis(50);
/// A process that never has a quiet second is still trimmed this often.
const BUSY_TRIM_EVERY: Duration = Duration::from_secs(10);
/// Free heap below this is left alone (trimming it is not worth a page fault later).
const MIN_FREE: usize = 2 << 20;

/// Freed heap kept for reuse between trims.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP_FREE: usize = 64 << 20;
/// Allocations from this size up get their own mapping.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const OWN_MAPPING_FROM: usize = 4 << 20;

/// Tells glibc to keep freed heap for reuse (glibc only; a no-op elsewhere). By default glibc
/// returns the top of the heap as soon as 128 KiB of it are free, and maps blocks from 128 KiB
/// up on their own, so every relay read buffer (64 KiB, freed once the peer took it) faulted
/// fresh zeroed pages in again: about a tenth of the agent's CPU in a bulk transfer went to
/// page faults. Call it before other threads start.
pub fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREE as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM as libc::c_int);
    }
}

/// Keeps freed heap ([`keep_freed_heap`]) and starts the trimmer thread, which still gives the
/// memory back after a burst, so RSS returns to its baseline all the same (glibc only).
pub fn spawn_trimmer() {
    keep_freed_heap();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("spoke-trim".into())
            .spawn(|| {
                let (mut cpu, mut since_trim) = (cpu_time(), Duration::ZERO);
                loop {
                    std::thread::sleep(INTERVAL);
                    since_trim += INTERVAL;
                    let now = cpu_time();
                    let busy = now.saturating_sub(cpu) > BUSY_CPU;
                    cpu = now;
                    if trim_now(busy, since_trim) {
                        since_trim = Duration::ZERO;
                        trim_if_worth_it();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the heap trimmer");
        }
    }
}

/// Whether this look trims: after a quiet second, or when a busy process has gone
/// [`BUSY_TRIM_EVERY`] without a trim.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_now(busy: bool, since_trim: Duration) -> bool {
    !busy || since_trim >= BUSY_TRIM_EVERY
}

/// CPU time the whole process has used.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Free bytes held by the allocator's arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn free_heap_bytes() -> usize {
    // SAFETY: mallinfo2 only reads allocator statistics.
    unsafe { libc::mallinfo2() }.fordblks
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_if_worth_it() {
    if free_heap_bytes() >= MIN_FREE {
        // SAFETY: malloc_trim has no preconditions; it returns free pages of every arena.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_quiet_second_and_now_and_then_while_busy() {
        assert!(trim_now(false, INTERVAL));
        assert!(!trim_now(true, INTERVAL));
        assert!(!trim_now(true, BUSY_TRIM_EVERY - INTERVAL));
        assert!(trim_now(true, BUSY_TRIM_EVERY));
    }

    #[test]
    fn cpu_time_counts_this_process_work() {
        // Spins until the clock shows more than a busy second's CPU (on a loaded machine
        // that takes longer than its CPU time, hence the generous cap).
        let before = cpu_time();
        let (t, mut x) = (std::time::Instant::now(), 0u64);
        while cpu_time().saturating_sub(before) <= BUSY_CPU {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "20 s of spinning did not count as {BUSY_CPU:?} of CPU"
            );
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
    }
}
