//! Stand-in for spoke-agent's backend leg while the real agent is being written: loads the
//! eBPF data plane exactly as the agent does and relays each accepted "frontend" connection
//! to `--backend`, marking the backend socket with `Ebpf::prepare_socket` before connect().
//!
//! stdout: one `STATUS <json>` line, then `READY` once listening. `--admin` serves
//! `/metrics` (OpenMetrics text) and `/status` (JSON).
use std::{net::SocketAddr, os::fd::AsFd, sync::Arc};

use anyhow::Context;
use clap::Parser;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

#[path = "../src/ebpf/mod.rs"]
#[allow(dead_code)]
mod ebpf;

#[derive(Parser)]
struct Cli {
    /// `LISTEN=BACKEND`: relay each connection accepted on LISTEN to BACKEND (repeatable).
    #[arg(long, value_parser = parse_route)]
    route: Vec<(SocketAddr, SocketAddr)>,
    /// Admin address serving /metrics and /status.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Relay buffer size per direction.
    #[arg(long, default_value_t = 256 * 1024)]
    buf: usize,
    /// Print the status and exit (capability tests).
    #[arg(long)]
    exit_after_load: bool,
    #[command(flatten)]
    ebpf: ebpf::EbpfArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let cfg = cli.ebpf.config()?;
    let ebpf = Arc::new(ebpf::Ebpf::load(&cfg)?);
    println!("STATUS {}", serde_json::to_string(&ebpf.status())?);
    if cli.exit_after_load {
        return Ok(());
    }
    let mut registry = prometheus_client::registry::Registry::default();
    ebpf.register_metrics(&mut registry);
    let registry = Arc::new(registry);

    if let Some(admin) = cli.admin {
        let listener = TcpListener::bind(admin).await.context("bind admin")?;
        let (ebpf, registry) = (ebpf.clone(), registry.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (ebpf, registry) = (ebpf.clone(), registry.clone());
                tokio::spawn(async move {
                    let _ = serve_admin(conn, &ebpf, &registry).await;
                });
            }
        });
    }

    for (listen, backend) in cli.route {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("bind {listen}"))?;
        let (ebpf, buf) = (ebpf.clone(), cli.buf);
        tokio::spawn(async move {
            while let Ok((front, _)) = listener.accept().await {
                let ebpf = ebpf.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay(front, backend, &ebpf, buf).await {
                        tracing::warn!("relay to {backend}: {e:#}");
                    }
                });
            }
        });
    }
    println!("READY");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn parse_route(s: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let (l, b) = s.split_once('=').context("expected LISTEN=BACKEND")?;
    Ok((l.parse()?, b.parse()?))
}

async fn relay(
    mut front: TcpStream,
    backend: SocketAddr,
    ebpf: &ebpf::Ebpf,
    buf: usize,
) -> anyhow::Result<()> {
    let sock = if backend.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // The agent's dial path does exactly this: mark, then connect.
    ebpf.prepare_socket(sock.as_fd())?;
    let mut back = sock.connect(backend).await?;
    front.set_nodelay(true)?;
    back.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut front, &mut back, buf, buf).await?;
    Ok(())
}

async fn serve_admin(
    mut conn: TcpStream,
    ebpf: &ebpf::Ebpf,
    registry: &prometheus_client::registry::Registry,
) -> anyhow::Result<()> {
    let mut req = Vec::new();
    let mut chunk = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&chunk[..n]);
    }
    let req = String::from_utf8_lossy(&req);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (ctype, body) = match path {
        "/metrics" => {
            let mut body = String::new();
            prometheus_client::encoding::text::encode(&mut body, registry)?;
            (
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        }
        _ => ("application/json", serde_json::to_string(&ebpf.status())?),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    Ok(())
}
