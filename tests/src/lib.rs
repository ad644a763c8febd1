//! Harness for Spoke's end-to-end tests: real `spoke-server` / `spoke-agent` processes, real TLS,
//! real sockets. Every wait has a timeout; every spawned process and namespace is cleaned up by a
//! Drop guard, and process logs are printed when a test fails.

pub mod apiserver;
pub mod backends;
pub mod bins;
pub mod certs;
pub mod cgroup;
pub mod cluster;
pub mod connect;
pub mod curl;
pub mod data;
pub mod faultnet;
pub mod fleet;
pub mod forwarder;
pub mod garbage;
pub mod goclient;
pub mod grpc;
pub mod h2wire;
pub mod http;
pub mod metrics;
pub mod netns;
pub mod ports;
pub mod process;
pub mod procfs;
pub mod rotation;
pub mod testdir;
pub mod tls;
pub mod wait;

/// A bidirectional byte stream (TCP, TLS over TCP or a Unix socket) behind one type.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Whether this is a CI run, where a test that cannot run must fail instead of skipping.
/// Any value of `CI` but empty, `0` or `false` counts (CI systems set `true` or `1`).
pub fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
}
