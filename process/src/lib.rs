//! What every Spoke process has around its data plane: the health/admin HTTP servers and the
//! `/metrics` exposition, logging with klog's flags, Go-style flag values, and returning freed
//! heap to the kernel, resource limits. Nothing here touches a tunnelled byte.
pub mod admin;
pub mod exposition;
pub mod flags;
pub mod klog;
pub mod limits;
pub mod logging;
pub mod memory;

use std::time::Duration;

/// How often certificate and key files are checked for changes.
pub const TLS_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The data path's runtime: one thread. On a 2-vCPU node it beats a work-stealing pool (fewer
/// cross-thread wake-ups per packet) and leaves a core for the other process.
pub fn data_path_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}
