//! What every Spoke process has around its data plane: the health/admin HTTP servers and the
//! `/metrics` exposition, logging with klog's flags, Go-style flag values, and returning freed
//! heap to the kernel. Nothing here touches a tunnelled byte.
pub mod admin;
pub mod exposition;
pub mod flags;
pub mod klog;
pub mod logging;
pub mod memory;
