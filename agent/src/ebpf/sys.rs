//! Small OS queries the loader needs: cgroup2 mount, capabilities, socket cookies.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    path::PathBuf,
};

/// First cgroup2 mount point in /proc/mounts (not always /sys/fs/cgroup: hybrid hierarchies
/// mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/mounts escapes spaces as \040.
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Names of the capabilities that loading and attaching need but this process lacks
/// (CAP_BPF + CAP_NET_ADMIN, or CAP_SYS_ADMIN which covers both).
pub fn missing_caps() -> Vec<&'static str> {
    let Some(eff) = effective_caps() else {
        return Vec::new();
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// The kernel's socket cookie (SO_COOKIE): stable for the socket's lifetime, never reused,
/// and the same value `bpf_get_socket_cookie()` returns to the programs.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    socket_u64(fd, libc::SO_COOKIE)
}

/// The socket's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14): the value
/// `bpf_get_netns_cookie()` returns to the programs for it.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    socket_u64(fd, SO_NETNS_COOKIE)
}

/// A `u64` socket option at SOL_SOCKET level.
fn socket_u64(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, output buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it where allowed. Newer
/// kernels use memcg accounting and ignore it, so failure is not an error.
pub fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
