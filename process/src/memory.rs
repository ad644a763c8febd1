//! Returning freed heap to the kernel after bursts. glibc keeps freed chunks in its arenas,
//! so a process that once held 1,000 connections would keep their memory resident forever
//! (the "RSS never goes down" complaint about upstream). A low-priority thread checks the
//! free space in the arenas every few seconds and trims when it is worth it.
use std::time::Duration;

/// How often the arenas are checked.
const INTERVAL: Duration = Duration::from_secs(5);
/// Free heap below this is left alone (trimming it is not worth a page fault later).
const MIN_FREE: usize = 2 << 20;

/// Starts the trimmer thread (glibc only; a no-op elsewhere).
pub fn spawn_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("spoke-trim".into())
            .spawn(|| loop {
                std::thread::sleep(INTERVAL);
                trim_if_worth_it();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the heap trimmer");
        }
    }
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
