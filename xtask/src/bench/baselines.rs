//! Baselines on loopback: `ssh -L` through a throw-away sshd (own config, host key and
//! authorized key; the system sshd is never touched) and a stunnel TLS hop.
use super::env::{run, which};
use super::pki::Pki;
use super::procs::{free_port, Proc};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// `ssh -N -L` to a private sshd: a forwarding port that leads to `backend`.
pub struct SshTunnel {
    pub port: SocketAddr,
    pub ssh: Proc,
    pub sshd: Proc,
}

pub fn ssh(work: &Path, backend: SocketAddr) -> Result<SshTunnel> {
    let sshd_bin = which("/usr/sbin/sshd").context("sshd not installed (openssh-server)")?;
    let ssh_bin = which("ssh").context("ssh not installed (openssh-client)")?;
    let dir = work.join("ssh");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd")?; // privilege separation directory sshd insists on
    let d = |f: &str| dir.join(f).display().to_string();
    for k in ["hostkey", "userkey"] {
        if !dir.join(k).exists() {
            run(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-f", &d(k)],
            )?;
        }
    }
    std::fs::copy(dir.join("userkey.pub"), dir.join("authorized_keys"))?;
    let port = free_port();
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nAllowTcpForwarding yes\n\
         Ciphers aes128-gcm@openssh.com\nCompression no\nLogLevel ERROR\n",
        d("hostkey"),
        d("sshd.pid"),
        d("authorized_keys")
    );
    std::fs::write(dir.join("sshd_config"), cfg)?;
    let sshd = Proc::spawn(
        "sshd",
        None,
        &sshd_bin,
        &["-D".into(), "-e".into(), "-f".into(), d("sshd_config")],
        &dir.join("sshd.log"),
    )?;
    wait_port(port, Duration::from_secs(10)).context("throw-away sshd did not listen")?;
    let local = free_port();
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());
    let args: Vec<String> = [
        "-N",
        "-T",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "Compression=no",
        "-F",
        "/dev/null",
        "-c",
        "aes128-gcm@openssh.com",
        "-i",
        &d("userkey"),
        "-p",
        &port.to_string(),
        "-L",
        &format!("127.0.0.1:{local}:{backend}"),
        &format!("{user}@127.0.0.1"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut ssh = Proc::spawn("ssh", None, &ssh_bin, &args, &dir.join("ssh.log"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
        if let Some(st) = ssh.exited() {
            bail!("ssh -L exited ({st}): {}", ssh.last_error());
        }
        if Instant::now() > deadline {
            bail!("ssh -L port not open after 15 s: {}", ssh.last_error());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(SshTunnel {
        port: SocketAddr::from(([127, 0, 0, 1], local)),
        ssh,
        sshd,
    })
}

fn wait_port(port: u16, max: Duration) -> Result<()> {
    let deadline = Instant::now() + max;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("port {port} not open");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    Ok(())
}

/// stunnel client (plain → TLS) and stunnel server (TLS → plain backend).
pub struct Stunnel {
    pub port: SocketAddr,
    pub client: Proc,
    pub server: Proc,
}

pub fn stunnel(work: &Path, pki: &Pki, backend: SocketAddr) -> Result<Stunnel> {
    let bin = which("stunnel4")
        .or_else(|| which("stunnel"))
        .context("stunnel not installed (stunnel4)")?;
    let dir = work.join("stunnel");
    std::fs::create_dir_all(&dir)?;
    let (sport, cport) = (free_port(), free_port());
    let server_cfg = format!(
        "foreground = yes\npid =\nsyslog = no\ndebug = 3\n[s]\naccept = 127.0.0.1:{sport}\nconnect = {backend}\ncert = {}\nkey = {}\n",
        pki.server.cert.display(),
        pki.server.key.display()
    );
    let client_cfg = format!(
        "foreground = yes\npid =\nsyslog = no\ndebug = 3\n[c]\nclient = yes\naccept = 127.0.0.1:{cport}\nconnect = 127.0.0.1:{sport}\nCAfile = {}\nverifyChain = yes\ncheckHost = localhost\n",
        pki.ca.display()
    );
    std::fs::write(dir.join("server.conf"), server_cfg)?;
    std::fs::write(dir.join("client.conf"), client_cfg)?;
    let server = Proc::spawn(
        "stunnel-server",
        None,
        &bin,
        &[dir.join("server.conf").display().to_string()],
        &dir.join("server.log"),
    )?;
    let client = Proc::spawn(
        "stunnel-client",
        None,
        &bin,
        &[dir.join("client.conf").display().to_string()],
        &dir.join("client.log"),
    )?;
    wait_port(sport, Duration::from_secs(10))
        .with_context(|| format!("stunnel server: {}", server.last_error()))?;
    wait_port(cport, Duration::from_secs(10))
        .with_context(|| format!("stunnel client: {}", client.last_error()))?;
    Ok(Stunnel {
        port: SocketAddr::from(([127, 0, 0, 1], cport)),
        client,
        server,
    })
}
