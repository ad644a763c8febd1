//! Free TCP ports on 127.0.0.1 for the processes under test (which bind them themselves).

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that was free a moment ago and has not been handed out before in this process.
/// It is drawn from below the namespace's ephemeral range (`ip_local_port_range`): a port
/// from `bind(:0)` is an ephemeral one, and any outbound connection made before the process
/// under test binds it could take it (a bench run lost a server to "Address already in
/// use" that way). Another process may still draw the same port; tests keep that window short.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let below = ephemeral_low().clamp(LOWEST + 1000, u16::MAX);
    for _ in 0..10_000 {
        let port = rand::rng().random_range(LOWEST..below);
        if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    // Everything below the range is taken: fall back to the kernel's choice.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if handed.insert(port) {
            return port;
        }
    }
}

/// The lowest port handed out: above the well-known and most registered services' ports.
const LOWEST: u16 = 10_000;

/// The first port of this network namespace's ephemeral range (32768 when unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Raises this process's open-file limits as far as the kernel allows (children inherit
/// them): tests open thousands of sockets, and a fresh machine's hard limit may be 1024.
pub fn raise_nofile_limit() {
    spoke_process::limits::raise_open_files_to_kernel_max();
}

/// Current soft open-file limit of this process.
pub fn nofile_limit() -> u64 {
    spoke_process::limits::open_files()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for p in ports {
            assert!(
                (LOWEST..low.max(LOWEST + 1000)).contains(&p),
                "{p} is not below {low}"
            );
            TcpListener::bind(("127.0.0.1", p)).unwrap_or_else(|e| panic!("bind {p}: {e}"));
        }
    }
}
