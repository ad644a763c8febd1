//! The real grpc-go client of `tests/real-clients/goclient` (konnectivity-client's behaviour on
//! Debian bookworm's grpc-go 1.33.3), built offline in GOPATH mode from Debian's Go packages and
//! cached under the target directory, keyed by its sources and the Go version.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Command;

/// Where Debian's `golang-*-dev` packages put Go sources.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// Debian packages the client needs (also in xtask's `APT_PACKAGES`).
pub const APT_HINT: &str = "apt-get install golang-go golang-google-grpc-dev \
     golang-golang-x-net-dev golang-github-golang-protobuf-1-3-dev";

/// A cold build takes about half a minute on two cores; this is the bound.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// The client's Go sources.
pub fn source_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("real-clients/goclient")
}

fn go_env(cmd: &mut Command, cache: &Path) {
    cmd.env("GO111MODULE", "off")
        .env("GOPATH", DEBIAN_GOPATH)
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", cache);
}

/// Why the client cannot be built here, if it cannot: no `go`, or a Go source package missing.
async fn missing() -> Option<String> {
    let go = Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if !go.is_ok_and(|s| s.success()) {
        return Some("no working `go` on PATH".into());
    }
    for (dir, package) in [
        ("google.golang.org/grpc", "golang-google-grpc-dev"),
        ("golang.org/x/net/http2/hpack", "golang-golang-x-net-dev"),
        (
            "github.com/golang/protobuf/proto",
            "golang-github-golang-protobuf-1-3-dev",
        ),
    ] {
        if !Path::new(DEBIAN_GOPATH).join("src").join(dir).is_dir() {
            return Some(format!("{DEBIAN_GOPATH}/src/{dir} missing ({package})"));
        }
    }
    None
}

/// The built client, or `None` after a visible `SKIP:` line when Go or its packages are missing
/// outside CI. In CI (`spoke_tests::in_ci()`) a missing toolchain fails the test instead.
pub async fn built(test: &str) -> Option<PathBuf> {
    if let Some(why) = missing().await {
        let why = format!("{test} needs Debian's Go toolchain and grpc-go: {why} ({APT_HINT})");
        assert!(
            !crate::in_ci(),
            "{why}, and this is a CI run: refusing to skip"
        );
        println!("SKIP: {why}");
        eprintln!("SKIP: {why}");
        return None;
    }
    Some(build().await.expect("building the real grpc-go client"))
}

/// Builds the client unless a binary for the same sources and Go version is cached.
pub async fn build() -> anyhow::Result<PathBuf> {
    let version = Command::new("go")
        .arg("version")
        .output()
        .await
        .context("go version")?
        .stdout;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    version.hash(&mut hasher);
    let mut files: Vec<PathBuf> = std::fs::read_dir(source_dir())
        .context("reading the client's sources")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "go"))
        .collect();
    files.sort();
    for f in &files {
        f.file_name().hash(&mut hasher);
        std::fs::read(f)
            .with_context(|| format!("reading {}", f.display()))?
            .hash(&mut hasher);
    }
    let dir = crate::bins::bin_dir().join("real-clients");
    let bin = dir.join(format!("goclient-{:016x}", hasher.finish()));
    // Tests of one process build once (the others wait and find the binary); test processes
    // may still build at once: each writes its own file and renames it into place.
    static BUILDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = BUILDING.lock().await;
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).context("creating the client's build directory")?;
    let tmp = dir.join(format!("goclient.{}.tmp", std::process::id()));
    let mut cmd = Command::new("go");
    cmd.arg("build")
        .arg("-o")
        .arg(&tmp)
        .arg(".")
        .current_dir(source_dir())
        .kill_on_drop(true);
    go_env(&mut cmd, &dir.join("gocache"));
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(BUILD_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("go build did not finish within {BUILD_TIMEOUT:?}"))?
        .context("running go build")?;
    anyhow::ensure!(
        out.status.success(),
        "go build failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &bin).context("moving the built client into place")?;
    eprintln!(
        "built the grpc-go client in {:.1?}: {}",
        started.elapsed(),
        bin.display()
    );
    Ok(bin)
}

/// What one run of the client printed.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: std::process::ExitStatus,
    /// Standard output (`ok` on success).
    pub stdout: String,
    /// Standard error (grpc-go's error on failure).
    pub stderr: String,
}

impl Run {
    /// Whether the tunnel completed.
    pub fn ok(&self) -> bool {
        self.status.success() && self.stdout.trim() == "ok"
    }

    /// The exit status and both outputs, for a failure message.
    pub fn describe(&self) -> String {
        format!(
            "{}; stdout {:?}; stderr {:?}",
            self.status,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Runs `tunnels` tunnels through the gRPC frontend on `socket` to `address`, dialling gRPC
/// target `target` (kube-apiserver: the socket path itself) with a dialer that opens `socket`:
/// 1 is kube-apiserver's single-use tunnel, more share one connection with a stream each
/// (konnectivity-client master's CreateGRPCTunnel). 60 s bound; the client's own waits are
/// shorter.
pub async fn tunnel(
    bin: &Path,
    socket: &Path,
    target: &str,
    tunnels: u32,
    address: &str,
) -> anyhow::Result<Run> {
    let mut cmd = Command::new(bin);
    cmd.arg("tunnel")
        .arg("-socket")
        .arg(socket)
        .arg("-target")
        .arg(target)
        .arg("-tunnels")
        .arg(tunnels.to_string())
        .arg("-address")
        .arg(address);
    run(cmd).await
}

/// Runs `tunnels` tunnels through the mTLS gRPC frontend at `addr` (Go's crypto/tls, server
/// name `localhost`, the client certificate `client` chained to `ca`), each sending `size`
/// pattern bytes in one DATA packet and reading them back.
pub async fn tunnel_tls(
    bin: &Path,
    addr: std::net::SocketAddr,
    ca: &Path,
    client: &crate::certs::CertKey,
    tunnels: u32,
    size: usize,
    address: &str,
) -> anyhow::Result<Run> {
    let mut cmd = Command::new(bin);
    cmd.arg("tunnel")
        .arg("-tls")
        .arg(addr.to_string())
        .arg("-ca")
        .arg(ca)
        .arg("-cert")
        .arg(&client.cert)
        .arg("-key")
        .arg(&client.key)
        .arg("-tunnels")
        .arg(tunnels.to_string())
        .arg("-size")
        .arg(size.to_string())
        .arg("-address")
        .arg(address);
    run(cmd).await
}

async fn run(mut cmd: Command) -> anyhow::Result<Run> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("the grpc-go client did not finish within 60 s")?
        .context("running the grpc-go client")?;
    Ok(Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
