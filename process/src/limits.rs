//! Resource limits: open files. Each tunnelled connection is two sockets, and a server holds
//! one per agent, so the usual soft limit of 1024 is far too low.
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises the soft open-file limit to the hard one, as Go's runtime does at start (so upstream
/// binaries get it too); the operator's hard limit stays. Returns the soft limit now.
pub fn raise_open_files() -> u64 {
    let lim = getrlimit(Resource::Nofile);
    // `None` is unlimited (never the case for open files on Linux, where `fs.nr_open` caps the
    // hard limit); `Option`'s order would put it below every number.
    let below_hard = match (lim.current, lim.maximum) {
        (Some(soft), Some(hard)) => soft < hard,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    open_files()
}

/// Raises both limits to at least the kernel's `fs.nr_open` capped at 2^20 (raising the hard
/// limit needs CAP_SYS_RESOURCE), and the soft one to the hard one as `raise_open_files` does: for tests and benchmarks that open
/// thousands of sockets on a machine whose hard limit may be 1024. Returns the soft limit now.
pub fn raise_open_files_to_kernel_max() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20u64);
    let want = nr_open.min(1 << 20);
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|soft| soft < want) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                // Never lowered.
                maximum: lim.maximum.map(|hard| hard.max(want)),
            },
        );
    }
    raise_open_files()
}

/// The soft open-file limit (`u64::MAX` when unlimited).
pub fn open_files() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_reaches_the_hard_one() {
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        assert_eq!(raise_open_files(), hard);
        assert!(raise_open_files_to_kernel_max() >= hard);
    }
}
