//! Returning freed heap to the kernel after bursts. glibc keeps freed chunks in its arenas,
//! so a process that once held 1,000 connections would keep their memory resident forever
//! (the "RSS never goes down" complaint about upstream). A low-priority thread checks the
//! free space in the arenas every second and trims when it is worth it.
use std::time::Duration;

/// How often the arenas are checked: soon after a burst (a reconnect storm's handshakes), so
/// RSS is back at its baseline within a second or two. A check costs one `mallinfo2`.
const INTERVAL: Duration = Duration::from_secs(1);
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
