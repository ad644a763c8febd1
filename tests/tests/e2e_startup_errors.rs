//! Bad start-up input: `spoke-server` and `spoke-agent` must exit non-zero within a few seconds
//! with a clear error on stderr that names the problem (the flag, the value or the file), and
//! never panic. An agent whose server is unreachable is the exception: that is not bad input,
//! so it must stay up, keep retrying and say why.
//!
//! Every case has a control: the same base flags with good files start (server healthy, agent
//! connected), so a failure below is caused by the one thing each case breaks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use spoke_tests::backends;
use spoke_tests::bins::{agent_bin, server_bin};
use spoke_tests::cluster::{status, wait_status, Env, Mode, ServerOpts, Transport};
use spoke_tests::ports::free_port;
use spoke_tests::process::Proc;
use spoke_tests::wait::{holds_for, poll_until};

/// How long a process refusing bad input may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a healthy process gets to come up in the controls.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent must survive an unreachable server.
const RETRY_WINDOW: Duration = Duration::from_secs(2);
/// The agent's failed-connect counter (upstream's name, exported without `_total`).
const AGENT_CONNECT_FAILURES: &str =
    "konnectivity_network_proxy_agent_server_connection_failure_count";

/// `--name=value` flags, with replace so each case changes exactly one thing.
#[derive(Debug, Clone)]
struct Flags(Vec<(String, String)>);

impl Flags {
    fn new(pairs: &[(&str, String)]) -> Self {
        Self(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }
    /// Sets `--name=value`, replacing an existing value.
    fn set(mut self, name: &str, value: impl AsRef<str>) -> Self {
        let value = value.as_ref().to_string();
        match self.0.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
        self
    }
    /// Sets a file flag.
    fn file(self, name: &str, path: &Path) -> Self {
        let p = path.display().to_string();
        self.set(name, p)
    }
    /// The port given to `--name`.
    fn port(&self, name: &str) -> u16 {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("--{name} is not a port in {:?}", self.0))
    }
    fn args(&self) -> Vec<String> {
        self.0.iter().map(|(k, v)| format!("--{k}={v}")).collect()
    }
    /// The args plus raw extra arguments (e.g. an unknown flag).
    fn args_with(&self, extra: &[&str]) -> Vec<String> {
        let mut a = self.args();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }
}

/// Valid server flags: gRPC over a Unix socket, mTLS on the agent port, all on loopback.
fn server_flags(env: &Env) -> Flags {
    let main = &env.pki.main;
    let sock = env.dir.join("server.sock");
    Flags::new(&[
        ("mode", "grpc".into()),
        ("uds-name", sock.display().to_string()),
        ("server-port", "0".into()),
        ("agent-bind-address", "127.0.0.1".into()),
        ("agent-port", free_port().to_string()),
        ("cluster-cert", main.server.cert.display().to_string()),
        ("cluster-key", main.server.key.display().to_string()),
        ("cluster-ca-cert", main.ca.display().to_string()),
        ("health-bind-address", "127.0.0.1".into()),
        ("health-port", free_port().to_string()),
        ("admin-bind-address", "127.0.0.1".into()),
        ("admin-port", free_port().to_string()),
        ("server-id", "startup-errors".into()),
    ])
}

/// Valid agent flags dialling `server_port` on 127.0.0.1.
fn agent_flags(env: &Env, server_port: u16) -> Flags {
    let main = &env.pki.main;
    Flags::new(&[
        ("proxy-server-host", "127.0.0.1".into()),
        ("proxy-server-port", server_port.to_string()),
        ("ca-cert", main.ca.display().to_string()),
        ("agent-cert", main.agent.cert.display().to_string()),
        ("agent-key", main.agent.key.display().to_string()),
        ("agent-id", "startup-errors-agent".into()),
        ("health-server-host", "127.0.0.1".into()),
        ("health-server-port", free_port().to_string()),
        ("admin-bind-address", "127.0.0.1".into()),
        ("admin-server-port", free_port().to_string()),
        ("sync-interval", "100ms".into()),
        ("sync-interval-cap", "1s".into()),
        ("ebpf", "off".into()),
    ])
}

/// How a process that had to exit ended.
#[derive(Debug)]
struct Exit {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs `program args` to completion (stdout and stderr captured apart); panics if it is still
/// running after [`EXIT_TIMEOUT`] (the child is killed then).
async fn run_to_exit(program: &Path, args: &[String]) -> Exit {
    let started = Instant::now();
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    let pid = child.id();
    let out = match tokio::time::timeout(EXIT_TIMEOUT, child.wait_with_output()).await {
        Ok(r) => r.unwrap_or_else(|e| panic!("wait for {}: {e}", program.display())),
        Err(_) => panic!(
            "{} (pid {pid:?}) {args:?} did not exit within {EXIT_TIMEOUT:?} on bad input (hang); killed it",
            program.display()
        ),
    };
    Exit {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Runs the binary with `args` and asserts a clean refusal: non-zero exit code (not a signal, not
/// Rust's panic code 101), no "panicked" anywhere, and every `needle` in stderr.
async fn assert_refused(what: &str, program: &Path, args: &[String], needles: &[&str]) -> Exit {
    let exit = run_to_exit(program, args).await;
    let show = || {
        format!(
            "{what}: {} {args:?}\nexit: {}\nelapsed: {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            program.display(),
            exit.status,
            exit.elapsed,
            exit.stderr,
            exit.stdout
        )
    };
    let code = exit.status.code();
    assert!(
        code.is_some(),
        "killed by a signal instead of exiting:\n{}",
        show()
    );
    assert_ne!(code, Some(0), "exited 0 on bad input:\n{}", show());
    assert_ne!(
        code,
        Some(101),
        "exit code 101 is a Rust panic:\n{}",
        show()
    );
    for stream in [&exit.stderr, &exit.stdout] {
        assert!(!stream.contains("panicked"), "panicked:\n{}", show());
    }
    for needle in needles {
        assert!(
            exit.stderr.contains(needle),
            "stderr does not name the problem ({needle:?} missing):\n{}",
            show()
        );
    }
    println!(
        "{what}: exit {} after {:?}: {}",
        exit.status,
        exit.elapsed,
        exit.stderr
            .lines()
            .find(|l| l.starts_with("spoke-") || l.starts_with("error:"))
            .unwrap_or_default()
    );
    exit
}

/// Bad `--flag=value` cases on `base` for `who` (`server` or `agent`): parse errors must name
/// the flag and the value, validation errors (`(flag, value, needle)`) `spoke-{who}:` and `needle`.
async fn assert_bad_values_refused(
    who: &str,
    bin: &Path,
    base: &Flags,
    parse: &[(&str, &str)],
    validation: &[(&str, &str, &str)],
) {
    for &(flag, value) in parse {
        let args = base.clone().set(flag, value).args();
        assert_refused(
            &format!("{who} --{flag}={value}"),
            bin,
            &args,
            &[&format!("--{flag}"), value],
        )
        .await;
    }
    let prefix = format!("spoke-{who}:");
    for &(flag, value, needle) in validation {
        let args = base.clone().set(flag, value).args();
        assert_refused(
            &format!("{who} --{flag}={value}"),
            bin,
            &args,
            &[&prefix, needle],
        )
        .await;
    }
}

/// Each of `flags` (on fresh `base()` flags) pointing at `path`: refused by `spoke-{who}`, naming
/// the flag, the path and every `extra` needle; `label` says what is wrong with the file.
async fn assert_file_flags_refused(
    who: &str,
    bin: &Path,
    base: impl Fn() -> Flags,
    flags: &[&str],
    path: &Path,
    label: &str,
    extra: &[&str],
) {
    let prefix = format!("spoke-{who}:");
    let shown = path.display().to_string();
    for flag in flags {
        let args = base().file(flag, path).args();
        let flag_needle = format!("--{flag}");
        let mut needles = vec![prefix.as_str(), flag_needle.as_str(), shown.as_str()];
        needles.extend(extra.iter().copied().filter(|e| !e.is_empty()));
        assert_refused(&format!("{who} --{flag} {label}"), bin, &args, &needles).await;
    }
}

/// The garbage files of [`bad_pem_files`] on each of `flags`, then valid PEM of the wrong kind
/// (`wrong_kind`: flag and file): every case refused naming the flag and the file.
async fn assert_garbage_pem_refused(
    who: &str,
    bin: &Path,
    env: &Env,
    base: impl Fn() -> Flags,
    flags: &[&str],
    wrong_kind: &[(&str, &PathBuf)],
) {
    for (label, path, extra) in bad_pem_files(env) {
        assert_file_flags_refused(who, bin, &base, flags, &path, label, &[extra]).await;
    }
    for (flag, path) in wrong_kind {
        assert_file_flags_refused(who, bin, &base, &[flag], path, "wrong PEM type", &[]).await;
    }
}

/// A certificate with another (valid) key is refused naming `needles`, and the error says the
/// key does not match.
async fn assert_key_mismatch_refused(what: &str, bin: &Path, args: &[String], needles: &[&str]) {
    let exit = assert_refused(what, bin, args, needles).await;
    let lower = exit.stderr.to_lowercase();
    assert!(
        lower.contains("key") && (lower.contains("match") || lower.contains("consistent")),
        "the error should say the key does not match the certificate:\n{}",
        exit.stderr
    );
}

/// 127.0.0.1:`port`.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Spawns `spoke-agent` with `flags` (log `agent.log`); returns it and its health address.
fn spawn_agent(env: &Env, name: &str, flags: &Flags) -> (Proc, SocketAddr) {
    let health = loopback(flags.port("health-server-port"));
    let agent = Proc::spawn(name, &agent_bin(), flags.args(), env.dir.join("agent.log"));
    (agent, health)
}

/// Writes `content` to `dir/name`.
fn write_file(env: &Env, name: &str, content: &str) -> PathBuf {
    let path = env.dir.join(name);
    std::fs::write(&path, content).expect("write test file");
    path
}

/// Garbage inputs for a PEM flag: (label, path, what stderr must also say).
fn bad_pem_files(env: &Env) -> Vec<(&'static str, PathBuf, &'static str)> {
    let garbage = write_file(
        env,
        "garbage.pem",
        "this is not PEM at all\n\u{1}\u{2}\u{3} binary-ish junk\n",
    );
    let empty = write_file(env, "empty.pem", "");
    // Right armour, body is not base64.
    let broken = write_file(
        env,
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
    );
    // A directory cannot be read as a file (as root, a mode-000 file still can).
    let dir = env.dir.join("a-directory.pem");
    std::fs::create_dir_all(&dir).expect("mkdir");
    vec![
        ("garbage", garbage, ""),
        ("empty", empty, ""),
        ("broken base64", broken, ""),
        ("directory", dir, "directory"),
    ]
}

// ----------------------------------------------------------------------------------------------
// Controls: the base flags work.
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn control_server_and_agent_base_flags_start_and_connect() {
    let env = Env::new("startup_control");
    let sflags = server_flags(&env);
    let health = loopback(sflags.port("health-port"));
    let agent_port = sflags.port("agent-port");
    let mut server = Proc::spawn(
        "spoke-server control",
        &server_bin(),
        sflags.args(),
        env.dir.join("server.log"),
    );
    wait_status(&mut server, health, "/healthz", 200, START_TIMEOUT).await;

    let (mut agent, agent_health) =
        spawn_agent(&env, "spoke-agent control", &agent_flags(&env, agent_port));
    wait_status(&mut agent, agent_health, "/readyz", 200, START_TIMEOUT).await;
    wait_status(&mut server, health, "/readyz", 200, START_TIMEOUT).await;
    server.assert_running();
    agent.assert_running();
}

// ----------------------------------------------------------------------------------------------
// spoke-server
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_unknown_flag_exits_nonzero_naming_it() {
    let env = Env::new("srv_unknown_flag");
    let args = server_flags(&env).args_with(&["--no-such-flag-xyz=1"]);
    assert_refused(
        "server unknown flag",
        &server_bin(),
        &args,
        &["--no-such-flag-xyz"],
    )
    .await;
}

#[tokio::test]
async fn server_bad_flag_values_exit_nonzero_naming_flag_and_value() {
    let env = Env::new("srv_bad_values");
    // Parse-time errors (clap), then validation errors (flag combinations checked after parsing).
    assert_bad_values_refused(
        "server",
        &server_bin(),
        &server_flags(&env),
        &[
            ("mode", "bogus"),
            ("keepalive-time", "notaduration"),
            ("graceful-shutdown-timeout", "-5s"),
            ("agent-port", "70000"),
            ("max-connection-buffer-bytes", "lots"),
            ("proxy-strategies", "nearest"),
        ],
        &[
            ("server-count", "0", "--server-count"),
            ("server-port", "8090", "--server-port"),
        ],
    )
    .await;
}

#[tokio::test]
async fn server_missing_cert_files_exit_nonzero_naming_flag_and_path() {
    let env = Env::new("srv_missing_cert");
    let bin = server_bin();
    let missing = env.dir.join("does-not-exist.pem");
    let shown = missing.display().to_string();
    assert_file_flags_refused(
        "server",
        &bin,
        || server_flags(&env),
        &["cluster-cert", "cluster-key", "cluster-ca-cert"],
        &missing,
        "missing",
        &[],
    )
    .await;
    // The mTLS TCP frontend's files too.
    let main = &env.pki.main;
    let tcp = server_flags(&env)
        .set("uds-name", "")
        .set("server-bind-address", "127.0.0.1")
        .set("server-port", free_port().to_string())
        .file("server-cert", &missing)
        .file("server-key", &main.server.key)
        .file("server-ca-cert", &main.ca);
    assert_refused(
        "server --server-cert missing",
        &bin,
        &tcp.args(),
        &["spoke-server:", "--server-cert", &shown],
    )
    .await;
}

#[tokio::test]
async fn server_key_not_matching_cert_exits_nonzero_naming_both_flags() {
    let env = Env::new("srv_key_mismatch");
    let main = &env.pki.main;
    // The server certificate with the agent's (valid, but different) private key.
    let args = server_flags(&env)
        .file("cluster-cert", &main.server.cert)
        .file("cluster-key", &main.agent.key)
        .args();
    assert_key_mismatch_refused(
        "server cert/key mismatch",
        &server_bin(),
        &args,
        &[
            "spoke-server:",
            "--cluster-cert",
            "--cluster-key",
            &main.agent.key.display().to_string(),
        ],
    )
    .await;
}

#[tokio::test]
async fn server_garbage_pem_files_exit_nonzero_naming_flag_and_file() {
    let env = Env::new("srv_garbage_pem");
    // Garbage files, then valid PEM of the wrong kind (a private key where a certificate belongs
    // and vice versa).
    let main = &env.pki.main;
    assert_garbage_pem_refused(
        "server",
        &server_bin(),
        &env,
        || server_flags(&env),
        &["cluster-cert", "cluster-key", "cluster-ca-cert"],
        &[
            ("cluster-cert", &main.server.key),
            ("cluster-ca-cert", &main.server.key),
            ("cluster-key", &main.server.cert),
        ],
    )
    .await;
}

#[tokio::test]
async fn ports_already_in_use_exit_nonzero_naming_the_address() {
    let env = Env::new("ports_in_use");
    // Held for the whole test: whoever binds the same address gets EADDRINUSE.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a busy port");
    let port = busy.local_addr().expect("busy addr").port().to_string();
    let addr = format!("127.0.0.1:{port}");
    for flag in ["agent-port", "health-port", "admin-port"] {
        let args = server_flags(&env).set(flag, &port).args();
        assert_refused(
            &format!("server --{flag} in use"),
            &server_bin(),
            &args,
            &["spoke-server:", "cannot listen on", &addr, "in use"],
        )
        .await;
    }
    for flag in ["health-server-port", "admin-server-port"] {
        let args = agent_flags(&env, free_port()).set(flag, &port).args();
        assert_refused(
            &format!("agent --{flag} in use"),
            &agent_bin(),
            &args,
            &["spoke-agent:", "cannot listen on", &addr, "in use"],
        )
        .await;
    }
    drop(busy);
}

// ----------------------------------------------------------------------------------------------
// spoke-agent
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn agent_unknown_flag_exits_nonzero_naming_it() {
    let env = Env::new("agent_unknown_flag");
    let args = agent_flags(&env, free_port()).args_with(&["--no-such-flag-xyz=1"]);
    assert_refused(
        "agent unknown flag",
        &agent_bin(),
        &args,
        &["--no-such-flag-xyz"],
    )
    .await;
}

#[tokio::test]
async fn agent_bad_flag_values_exit_nonzero_naming_flag_and_value() {
    let env = Env::new("agent_bad_values");
    assert_bad_values_refused(
        "agent",
        &agent_bin(),
        &agent_flags(&env, free_port()),
        &[
            ("sync-interval", "notaduration"),
            ("dial-timeout", "5"),
            ("keepalive-time", "1x"),
            ("proxy-server-port", "notaport"),
            ("max-connection-buffer-bytes", "0"),
            ("ebpf", "sometimes"),
        ],
        &[
            ("sync-interval-cap", "10ms", "--sync-interval-cap"),
            ("proxy-server-port", "0", "--proxy-server-port"),
            ("agent-identifiers", "zone=a", "--agent-identifiers"),
            ("server-count-source", "min", "--server-count-source"),
        ],
    )
    .await;
}

#[tokio::test]
async fn agent_missing_cert_files_exit_nonzero_naming_flag_and_path() {
    let env = Env::new("agent_missing_cert");
    assert_file_flags_refused(
        "agent",
        &agent_bin(),
        || agent_flags(&env, free_port()),
        &["ca-cert", "agent-cert", "agent-key"],
        &env.dir.join("does-not-exist.pem"),
        "missing",
        &[],
    )
    .await;
}

#[tokio::test]
async fn agent_key_not_matching_cert_exits_nonzero_naming_both_flags() {
    let env = Env::new("agent_key_mismatch");
    let main = &env.pki.main;
    let args = agent_flags(&env, free_port())
        .file("agent-cert", &main.agent.cert)
        .file("agent-key", &main.frontend.key)
        .args();
    assert_key_mismatch_refused(
        "agent cert/key mismatch",
        &agent_bin(),
        &args,
        &[
            "spoke-agent:",
            "--agent-cert",
            "--agent-key",
            &main.frontend.key.display().to_string(),
        ],
    )
    .await;
}

#[tokio::test]
async fn agent_garbage_pem_files_exit_nonzero_naming_flag_and_file() {
    let env = Env::new("agent_garbage_pem");
    // Garbage files, then valid PEM of the wrong kind (a private key where a certificate belongs
    // and vice versa).
    let main = &env.pki.main;
    assert_garbage_pem_refused(
        "agent",
        &agent_bin(),
        &env,
        || agent_flags(&env, free_port()),
        &["ca-cert", "agent-cert", "agent-key"],
        &[
            ("ca-cert", &main.agent.key),
            ("agent-cert", &main.agent.key),
            ("agent-key", &main.agent.cert),
        ],
    )
    .await;
}

#[tokio::test]
async fn agent_with_unreachable_server_keeps_running_and_logs_retries() {
    let env = Env::new("agent_unreachable");
    // Bound but not listening: connects to it are refused, and nobody else can take the port.
    let (_reserved, dead) = backends::refusing_port();
    let flags = agent_flags(&env, dead.port());
    let started = Instant::now();
    let (mut agent, health) = spawn_agent(&env, "spoke-agent unreachable", &flags);
    wait_status(&mut agent, health, "/healthz", 200, START_TIMEOUT).await;

    // Alive, not ready, for the whole window.
    let window_left = RETRY_WINDOW.saturating_sub(started.elapsed());
    holds_for(
        "the agent to stay alive and unready while the server is unreachable",
        window_left.max(Duration::from_millis(500)),
        || {
            let running = agent.is_running();
            async move {
                if !running {
                    return Err("the agent exited".to_string());
                }
                match status(health, "/readyz").await? {
                    503 => Ok(()),
                    other => Err(format!("/readyz answered {other}, want 503")),
                }
            }
        },
    )
    .await;
    assert!(
        started.elapsed() >= RETRY_WINDOW,
        "the window must cover at least {RETRY_WINDOW:?}"
    );
    agent.assert_running();

    // It says why, naming the address, and it keeps trying (several failures counted).
    let target = dead.to_string();
    let log = agent.log();
    let reasons: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot connect to proxy server"))
        .collect();
    assert!(
        reasons.len() >= 2,
        "expected repeated 'cannot connect to proxy server' lines in {RETRY_WINDOW:?}; log:\n{log}"
    );
    assert!(
        reasons
            .iter()
            .all(|l| l.contains(&target) && l.to_lowercase().contains("refused")),
        "each retry line should name {target} and the reason (connection refused):\n{}",
        reasons.join("\n")
    );
    assert!(
        reasons.iter().all(|l| l.contains("retry_in")),
        "each failure line should say when it retries:\n{}",
        reasons.join("\n")
    );
    assert!(!log.contains("panicked"), "panicked:\n{log}");
    poll_until(
        "the agent to count at least 2 failed connects",
        Duration::from_secs(5),
        || async {
            let m = spoke_tests::metrics::scrape(health)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let n = m.counter(AGENT_CONNECT_FAILURES, &[("direction", "to_server")]);
            if n >= 2.0 {
                Ok(())
            } else {
                Err(format!(
                    "{AGENT_CONNECT_FAILURES}{{direction=to_server}} = {n}; present: {:?}",
                    m.names()
                ))
            }
        },
    )
    .await;
    agent.kill();
}

#[tokio::test]
async fn agent_connects_once_the_unreachable_server_comes_up() {
    // The retry loop is real: the same agent connects when a server appears on the port.
    let env = Env::new("agent_late_server");
    let mut server = env
        .server(ServerOpts::new(Mode::Grpc, Transport::Uds))
        .await;
    let port = server.agent_addr.port();
    server.proc.kill();
    let (mut agent, health) =
        spawn_agent(&env, "spoke-agent late server", &agent_flags(&env, port));
    poll_until(
        "the agent to log a failed connect",
        Duration::from_secs(10),
        || {
            let log = agent.log();
            async move {
                if log.contains("cannot connect to proxy server") {
                    Ok(())
                } else {
                    Err("no 'cannot connect to proxy server' yet".to_string())
                }
            }
        },
    )
    .await;
    agent.assert_running();
    server.proc.restart();
    server.wait_healthy().await;
    wait_status(&mut agent, health, "/readyz", 200, START_TIMEOUT).await;
    server.wait_ready().await;
}
