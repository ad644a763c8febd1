//! Load and fairness: 500 concurrent checksummed connections with no leaks; a stalled reader
//! does not hold up other connections and does not make the agent buffer without bound.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use spoke_tests::backends::{self, PatternRequest, CHUNK};
use spoke_tests::cluster::{wait_tables_empty, Agent, Env, Mode, Server, ServerOpts, Transport};
use spoke_tests::connect;
use spoke_tests::data::Verifier;
use spoke_tests::procfs;
use spoke_tests::wait::{self, poll_until, within};
use tokio::io::AsyncReadExt;

const CONNS: usize = 500;
const MAX_PAYLOAD: u64 = 256 * 1024;

fn fds(server: &Server, agent: &Agent) -> (usize, usize) {
    (
        procfs::fd_count(server.proc.pid()).unwrap(),
        procfs::fd_count(agent.proc.pid()).unwrap(),
    )
}

/// Runs one warm-up exchange and waits for the tables to drain, so lazily created resources
/// exist before baselines are taken.
async fn warm_up(server: &Server, agent: &Agent, backend: &backends::Backend) {
    let io = connect::tunnel(&server.frontend, &backend.target())
        .await
        .expect("warm-up tunnel");
    PatternRequest {
        down_len: 1 << 20,
        down_seed: 1,
        up_len: 1 << 20,
        up_seed: 2,
    }
    .run(io)
    .await
    .expect("warm-up exchange");
    wait_tables_empty(server, &[agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_connections_all_bytes_arrive_and_nothing_leaks() {
    spoke_tests::ports::raise_nofile_limit();
    assert!(
        spoke_tests::ports::nofile_limit() >= 4 * CONNS as u64,
        "open-file limit too low for {CONNS} connections"
    );
    let env = Env::new("conc500");
    let (mut server, mut agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Uds), |a| a)
        .await;
    let backend = backends::pattern().await;
    warm_up(&server, &agent, &backend).await;
    let (server_fds0, agent_fds0) = fds(&server, &agent);

    let run_seed: u64 = rand::random();
    println!("payload seed {run_seed:#x}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(run_seed);
    let requests: Vec<PatternRequest> = (0..CONNS)
        .map(|_| PatternRequest {
            down_len: rng.random_range(0..=MAX_PAYLOAD),
            down_seed: rng.random(),
            up_len: rng.random_range(0..=MAX_PAYLOAD),
            up_seed: rng.random(),
        })
        .collect();
    // All tunnels are opened first and held at a barrier, so the 500 really are concurrent;
    // the test joins the barrier too, to read the agent's memory with all of them open.
    let agent_rss0 = procfs::rss_bytes(agent.proc.pid()).unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(CONNS + 1));
    let tasks: Vec<_> = requests
        .iter()
        .map(|req| {
            let (req, barrier, frontend, target) = (
                *req,
                barrier.clone(),
                server.frontend.clone(),
                backend.target(),
            );
            tokio::spawn(async move {
                let tunnel = connect::tunnel(&frontend, &target).await;
                barrier.wait().await;
                req.run(tunnel?).await
            })
        })
        .collect();
    within(
        "500 tunnels to open",
        Duration::from_secs(60),
        barrier.wait(),
    )
    .await;
    let agent_rss = procfs::rss_bytes(agent.proc.pid()).unwrap();
    println!(
        "agent RSS {:.1} MiB idle, {:.1} MiB with {CONNS} tunnels open ({:.2} KiB each)",
        agent_rss0 as f64 / (1 << 20) as f64,
        agent_rss as f64 / (1 << 20) as f64,
        agent_rss.saturating_sub(agent_rss0) as f64 / 1024.0 / CONNS as f64
    );
    let results = within(
        "500 concurrent exchanges",
        Duration::from_secs(150),
        futures::future::join_all(tasks),
    )
    .await;
    let failures: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.unwrap()
                .err()
                .map(|e| format!("#{i} {:?}: {e:#}", requests[i]))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {CONNS} connections failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // A handler is counted after it returns, which can be just after its client finished.
    let (accepted, completed, failed) = backend
        .stats
        .settled(CONNS as u64 + 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        (accepted, completed, failed),
        (CONNS as u64 + 1, CONNS as u64 + 1, 0),
        "backend (accepted, completed, failed) incl. warm-up"
    );

    wait_tables_empty(&server, &[&agent]).await;
    poll_until(
        "server and agent fd counts back to their baseline",
        Duration::from_secs(15),
        || async {
            let now = fds(&server, &agent);
            if now.0 <= server_fds0 && now.1 <= agent_fds0 {
                Ok(())
            } else {
                Err(format!(
                    "(server, agent) fds now {now:?}, baseline ({server_fds0}, {agent_fds0})"
                ))
            }
        },
    )
    .await;
    server.proc.assert_running();
    agent.proc.assert_running();
}

const BUFFER_CAP: u64 = 1 << 20;
const STALLED_LEN: u64 = 512 << 20;
const OTHERS: usize = 50;
const OTHER_LEN: u64 = 16 << 20;
const FIXED_OVERHEAD: u64 = 48 << 20;

/// The largest buffer TCP autotuning may give a socket (third field of `tcp_wmem`/`tcp_rmem`).
fn tcp_buffer_max(sysctl: &str) -> u64 {
    let path = format!("/proc/sys/net/ipv4/{sysctl}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{path}: unexpected {text:?}"))
}

/// Samples the peak RSS of the given pids until dropped.
struct RssSampler {
    peaks: Vec<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start(pids: &[u32]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<Arc<AtomicU64>> = pids.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let (pids, p, s) = (pids.to_vec(), peaks.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for (pid, peak) in pids.iter().zip(&p) {
                    if let Ok(rss) = procfs::rss_bytes(*pid) {
                        peak.fetch_max(rss, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { peaks, stop }
    }
    fn peaks(&self) -> Vec<u64> {
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_does_not_block_others_and_agent_memory_stays_bounded() {
    let env = Env::new("stalled");
    let cap = format!("--max-connection-buffer-bytes={BUFFER_CAP}");
    let (server, agent) = env
        .pair(
            ServerOpts::new(Mode::HttpConnect, Transport::Uds).arg(&cap),
            |a| a.arg(&cap),
        )
        .await;
    let backend = backends::pattern().await;
    warm_up(&server, &agent, &backend).await;
    let pids = [agent.proc.pid(), server.proc.pid()];
    let rss0: Vec<u64> = pids
        .iter()
        .map(|p| procfs::rss_bytes(*p).unwrap())
        .collect();
    let sampler = RssSampler::start(&pids);

    // The stalled connection: asks for 512 MiB, then never reads.
    // Its own backend, so the byte count is the stalled connection's alone.
    let stalled_backend = backends::pattern().await;
    let mut stalled = connect::tunnel(&server.frontend, &stalled_backend.target())
        .await
        .expect("stalled tunnel");
    PatternRequest::download(STALLED_LEN, 0x57a1)
        .send_header(&mut stalled)
        .await
        .unwrap();
    let stalled_at = poll_until(
        "the stalled connection's backend to be back-pressured",
        Duration::from_secs(30),
        {
            let mut last = (u64::MAX, Instant::now());
            let stats = stalled_backend.stats.clone();
            move || {
                let sent = stats.sent();
                let (prev, since) = last;
                if sent != prev {
                    last = (sent, Instant::now());
                }
                async move {
                    if sent == prev && since.elapsed() >= Duration::from_secs(1) && sent > 0 {
                        Ok(sent)
                    } else {
                        Err(format!(
                            "backend has written {sent} bytes and is still going"
                        ))
                    }
                }
            }
        },
    )
    .await;
    // What may sit between the stalled backend and the unread client: the backend's TCP send
    // and the agent's receive buffer (kernel autotuning maxima), the tunnel's per-connection
    // buffer in each process, and the frontend socket's buffers.
    let in_flight_bound =
        tcp_buffer_max("tcp_wmem") + tcp_buffer_max("tcp_rmem") + 2 * BUFFER_CAP + (2 << 20);
    println!("stalled backend blocked after writing {stalled_at} bytes (bound {in_flight_bound})");
    assert!(
        stalled_at <= in_flight_bound,
        "backend wrote {stalled_at} bytes although the client reads nothing: more than socket buffers and the {BUFFER_CAP}-byte connection buffers can hold ({in_flight_bound})"
    );

    // 50 others on the same agent must complete meanwhile.
    let started = Instant::now();
    let tasks: Vec<_> = (0..OTHERS)
        .map(|i| {
            let (frontend, target) = (server.frontend.clone(), backend.target());
            tokio::spawn(async move {
                let io = connect::tunnel(&frontend, &target).await?;
                PatternRequest::download(OTHER_LEN, 1000 + i as u64)
                    .run(io)
                    .await
            })
        })
        .collect();
    let failures = wait::failures(
        "50 x 16 MiB transfers next to the stalled connection",
        Duration::from_secs(90),
        tasks,
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {OTHERS} transfers failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    println!(
        "{OTHERS} x {OTHER_LEN} bytes done in {:?} while one connection was stalled",
        started.elapsed()
    );

    let peaks = sampler.peaks();
    drop(sampler);
    // Every connection may hold up to the cap in each direction; plus fixed overhead.
    let bound = FIXED_OVERHEAD + 2 * (OTHERS as u64 + 1) * BUFFER_CAP;
    for ((name, peak), base) in ["agent", "server"].iter().zip(&peaks).zip(&rss0) {
        let growth = peak.saturating_sub(*base);
        println!("{name}: RSS baseline {base}, peak {peak}, growth {growth}, bound {bound}");
        assert!(growth <= bound, "{name} RSS grew by {growth} bytes (baseline {base}, peak {peak}) > bound {bound} while a 512 MiB download was stalled");
    }
    let still = stalled_backend.stats.sent();
    assert!(
        still < STALLED_LEN,
        "stalled backend wrote all {still} bytes to an unread connection"
    );

    // The stalled client now reads: every byte must still arrive, in order.
    let mut verifier = Verifier::new(0x57a1, STALLED_LEN);
    let mut buf = vec![0u8; CHUNK];
    within(
        "draining the formerly stalled 512 MiB",
        Duration::from_secs(120),
        async {
            while verifier.remaining() > 0 {
                let n = stalled.read(&mut buf).await.expect("read stalled tunnel");
                assert!(
                    n > 0,
                    "EOF after {} bytes of the stalled download",
                    verifier.received()
                );
                verifier.feed(&buf[..n]);
            }
        },
    )
    .await;
    verifier.finish().expect("stalled download intact");
    drop(stalled);
    wait_tables_empty(&server, &[&agent]).await;
}
