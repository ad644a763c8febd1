//! Running the real `curl` through the server's HTTP CONNECT frontend.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::backends::CHUNK;
use crate::certs::{CaSet, CertKey};
use crate::data::Verifier;

/// How curl reaches the proxy.
#[derive(Debug, Clone)]
pub enum CurlProxy<'a> {
    /// `--proxy http://addr` (e.g. a TCP relay to the Unix-socket frontend).
    Plain(std::net::SocketAddr),
    /// `--proxy https://addr` with mTLS: CA to verify the proxy, optional client cert.
    Tls(std::net::SocketAddr, &'a CaSet, Option<&'a CertKey>),
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl CurlProxy<'_> {
    fn args(&self) -> Vec<String> {
        let mut a = vec!["-p".to_string(), "--noproxy".into(), String::new()];
        match self {
            CurlProxy::Plain(addr) => a.extend(["--proxy".into(), format!("http://{addr}")]),
            CurlProxy::Tls(addr, ca, cert) => {
                a.extend([
                    "--proxy".into(),
                    format!("https://{addr}"),
                    "--proxy-cacert".into(),
                    path(&ca.ca),
                ]);
                if let Some(c) = cert {
                    a.extend([
                        "--proxy-cert".into(),
                        path(&c.cert),
                        "--proxy-key".into(),
                        path(&c.key),
                    ]);
                }
            }
        }
        a
    }
}

fn command(proxy: &CurlProxy<'_>, extra: &[&str], url: &str) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "120"])
        .args(proxy.args())
        .args(extra)
        .arg(url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Result of a curl run whose body was discarded.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// curl's exit code.
    pub exit_code: Option<i32>,
    /// `%{http_connect}`: the proxy's answer to CONNECT (0 if none).
    pub connect_code: u16,
    /// `%{http_code}`: the destination's answer (0 if none).
    pub http_code: u16,
    /// curl's stderr.
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Runs curl for `url` via `proxy`, discarding the body; reports the CONNECT and HTTP codes.
pub async fn run(proxy: &CurlProxy<'_>, url: &str) -> anyhow::Result<Outcome> {
    let start = std::time::Instant::now();
    let out = command(
        proxy,
        &["-o", "/dev/null", "-w", "%{http_connect} %{http_code}"],
        url,
    )
    .output()
    .await
    .context("running curl (is it installed?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut codes = stdout
        .split_whitespace()
        .map(|c| c.parse::<u16>().unwrap_or(0));
    Ok(Outcome {
        exit_code: out.status.code(),
        connect_code: codes.next().unwrap_or(0),
        http_code: codes.next().unwrap_or(0),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// Downloads `url` via `proxy` with `--fail`, streaming curl's stdout through a verifier that
/// requires exactly `len` bytes of `Pattern(seed)`.
pub async fn download_verified(
    proxy: &CurlProxy<'_>,
    url: &str,
    seed: u64,
    len: u64,
) -> anyhow::Result<()> {
    let mut child = command(proxy, &["--fail", "-o", "-"], url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning curl (is it installed?)")?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut verifier = Verifier::new(seed, len);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        verifier.feed(&buf[..n]);
    }
    let mut err = String::new();
    stderr.read_to_string(&mut err).await?;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "curl failed ({status}): {err}");
    verifier.finish()
}
