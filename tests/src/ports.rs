//! Free TCP ports on 127.0.0.1 for the processes under test (which bind them themselves).

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that was free a moment ago and has not been handed out before in this process.
/// The kernel may still hand it to another process in between; tests keep that window short.
pub fn free_port() -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap();
    let handed = handed.get_or_insert_with(HashSet::new);
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

/// Raises this process's open-file limits as far as the kernel allows (children inherit
/// them): tests open thousands of sockets, and a fresh machine's hard limit may be 1024.
pub fn raise_nofile_limit() {
    spoke_process::limits::raise_open_files_to_kernel_max();
}

/// Current soft open-file limit of this process.
pub fn nofile_limit() -> u64 {
    spoke_process::limits::open_files()
}
