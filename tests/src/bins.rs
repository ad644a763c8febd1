//! Locating the binaries under test.

use std::path::PathBuf;

/// Directory holding `spoke-server` and `spoke-agent`: env `SPOKE_BIN_DIR`, else the cargo target
/// profile directory of the running test executable (`target/debug/deps/<test>` → `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPOKE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of binary `name`; panics with instructions when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --bins` first (or set SPOKE_BIN_DIR)",
        path.display()
    );
    path
}

/// The server binary.
pub fn server_bin() -> PathBuf {
    bin("spoke-server")
}

/// The agent binary.
pub fn agent_bin() -> PathBuf {
    bin("spoke-agent")
}
