//! Two servers (`--server-count=2`) behind one address: the agent holds a tunnel to each.

use std::time::Duration;

use spoke_tests::backends;
use spoke_tests::cluster::{gauge, AgentOpts, Env, Mode, ServerOpts, Transport};
use spoke_tests::connect;
use spoke_tests::forwarder::{Forwarder, Target};
use spoke_tests::metrics::names;
use spoke_tests::wait::poll_until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_behind_round_robin_address_connects_to_both_servers() {
    let env = Env::new("ha2");
    let opts = |id: &str| {
        ServerOpts::new(Mode::HttpConnect, Transport::Uds)
            .id(id)
            .count(2)
    };
    let mut servers = [
        env.server(opts("spoke-a")).await,
        env.server(opts("spoke-b")).await,
    ];
    let lb =
        Forwarder::round_robin(servers.iter().map(|s| Target::Tcp(s.agent_addr)).collect()).await;
    let mut agent = env.agent(AgentOpts::new(lb.addr)).await;
    agent.wait_ready().await;

    poll_until(
        "agent open_server_connections == 2",
        Duration::from_secs(20),
        || async {
            let m = agent.metrics().await.map_err(|e| format!("{e:#}"))?;
            match gauge(&m, names::AGENT_OPEN_SERVERS)? {
                2.0 => Ok(()),
                v => Err(format!("open_server_connections = {v}")),
            }
        },
    )
    .await;
    for s in servers.iter_mut() {
        s.wait_ready().await;
        let m = s.metrics().await.expect("server metrics");
        assert_eq!(
            m.get(names::SERVER_READY_BACKENDS),
            Some(1.0),
            "server {} ready_backend_connections",
            s.id
        );
    }

    let echo = backends::echo().await;
    for s in &servers {
        connect::echo_roundtrip(&s.frontend, &echo.target())
            .await
            .unwrap_or_else(|e| panic!("dial through server {}: {e:#}", s.id));
    }
    // The agent keeps exactly one tunnel per server (duplicates from the round robin are closed).
    let m = agent.metrics().await.expect("agent metrics");
    assert_eq!(
        m.get(names::AGENT_OPEN_SERVERS),
        Some(2.0),
        "open_server_connections after the dials"
    );
    assert_eq!(
        echo.stats.snapshot().0,
        2,
        "one destination connection per dial"
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream's lease-based HA, with several server addresses on the agents.

mod leases {
    use super::*;
    use spoke_tests::apiserver::ApiServer;
    use spoke_tests::cluster::{Agent, Server};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    const NS: &str = "kube-system";
    const LEASE_DURATION: u64 = 10;
    const SYNC_INTERVAL: Duration = Duration::from_secs(1);

    async fn gauge_of(
        what: &str,
        timeout: Duration,
        scrape: impl Fn() -> futures::future::BoxFuture<
            'static,
            anyhow::Result<spoke_tests::metrics::Metrics>,
        >,
        name: &str,
        want: f64,
    ) {
        poll_until(what, timeout, || {
            let f = scrape();
            async move {
                let m = f.await.map_err(|e| format!("{e:#}"))?;
                match gauge(&m, name)? {
                    v if v == want => Ok(()),
                    v => Err(format!("{name} = {v}")),
                }
            }
        })
        .await;
    }

    fn agent_scrape(
        a: &Agent,
    ) -> impl Fn() -> futures::future::BoxFuture<'static, anyhow::Result<spoke_tests::metrics::Metrics>>
    {
        let addr = a.health_addr;
        move || Box::pin(spoke_tests::metrics::scrape(addr))
    }

    fn server_scrape(
        s: &Server,
    ) -> impl Fn() -> futures::future::BoxFuture<'static, anyhow::Result<spoke_tests::metrics::Metrics>>
    {
        let addr = s.health_addr;
        move || Box::pin(spoke_tests::metrics::scrape(addr))
    }

    /// Unix seconds (fractional) when `lease` expires: renewTime + leaseDurationSeconds.
    fn expiry(lease: &serde_json::Value) -> f64 {
        let renew = lease["spec"]["renewTime"].as_str().unwrap_or_default();
        let t: spoke_k8s::k8s_openapi::jiff::Timestamp = renew.parse().expect("renewTime parses");
        t.as_millisecond() as f64 / 1000.0
            + lease["spec"]["leaseDurationSeconds"]
                .as_f64()
                .unwrap_or(0.0)
    }

    fn unix_now() -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64()
    }

    /// Three servers publishing leases, two agents counting them and dialling all three
    /// addresses (no load balancer). One server is SIGKILLed under a steady dial load through
    /// the other two: its lease expires and is collected, the agents count 2 within 45 s and no
    /// dial fails; it comes back and the agents reconnect within one sync interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_servers_with_leases_and_agents_counting_them() {
        let env = Env::new("ha_leases");
        let api = ApiServer::start(&env.pki.main.server, &env.pki.main.ca).await;
        api.user("server-token", "spoke-server", &["* leases"]);
        api.user(
            "agent-token",
            "system:serviceaccount:kube-system:konnectivity-agent",
            &["list leases", "watch leases"],
        );
        let server_kc = api.kubeconfig(env.dir.path(), "server.kubeconfig", "server-token");
        let agent_kc = api.kubeconfig(env.dir.path(), "agent.kubeconfig", "agent-token");
        let server_opts = |id: &str| {
            ServerOpts::new(Mode::HttpConnect, Transport::Uds)
                .id(id)
                .arg("--enable-lease-controller")
                .arg(&format!("--lease-namespace={NS}"))
                .arg(&format!("--kubeconfig={}", server_kc.display()))
                .arg(&format!("--lease-duration={LEASE_DURATION}s"))
                .arg("--lease-renew-interval=3s")
                .arg("--lease-gc-interval=2s")
                .arg("--count-server-leases")
        };
        let mut servers = Vec::new();
        for id in ["s1", "s2", "s3"] {
            servers.push(env.server(server_opts(id)).await);
        }
        let others: Vec<String> = servers[1..]
            .iter()
            .map(|s| format!("{}", s.agent_addr))
            .collect();
        let mut agents = Vec::new();
        for id in ["agent-1", "agent-2"] {
            let opts = AgentOpts::new(servers[0].agent_addr)
                .id(id)
                .arg(&format!("--proxy-server-host={}", others.join(",")))
                .arg("--count-server-leases")
                .arg(&format!("--lease-namespace={NS}"))
                .arg(&format!("--kubeconfig={}", agent_kc.display()))
                .arg(&format!("--sync-interval={}s", SYNC_INTERVAL.as_secs()))
                .arg("--sync-interval-cap=5s");
            agents.push(env.agent(opts).await);
        }
        for a in &agents {
            gauge_of(
                "agent known_server_count 3",
                Duration::from_secs(30),
                agent_scrape(a),
                "konnectivity_network_proxy_agent_known_server_count",
                3.0,
            )
            .await;
            gauge_of(
                "agent holds 3 tunnels",
                Duration::from_secs(30),
                agent_scrape(a),
                names::AGENT_OPEN_SERVERS,
                3.0,
            )
            .await;
        }
        for s in &servers {
            gauge_of(
                "server holds both agents",
                Duration::from_secs(30),
                server_scrape(s),
                names::SERVER_READY_BACKENDS,
                2.0,
            )
            .await;
        }
        let lease = |id: &str| api.get("leases", NS, &format!("konnectivity-proxy-server-{id}"));
        for id in ["s1", "s2", "s3"] {
            let l = lease(id).unwrap_or_else(|| panic!("lease of {id}"));
            assert_eq!(l["spec"]["holderIdentity"], id);
            assert_eq!(l["metadata"]["labels"]["k8s-app"], "konnectivity-server");
        }
        // The servers advertise the lease count too.
        let status = servers[1].status().await.expect("status");
        assert_eq!(status["server_count"], 3, "{status}");

        // A steady dial load through the two servers that stay.
        let echo = backends::echo().await;
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut load = Vec::new();
        for s in &servers[1..] {
            let (frontend, target) = (s.frontend.clone(), echo.target());
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            let id = s.id.clone();
            load.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        connect::echo_roundtrip(&frontend, &target),
                    )
                    .await
                    {
                        Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(Err(e)) => {
                            errors.push(format!("{id}: {e:#}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => {
                            errors.push(format!("{id}: timed out"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                errors
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        // SIGKILL s1: nothing deletes its lease but the others' collector.
        let last = lease("s1").expect("lease of s1");
        let killed = Instant::now();
        servers[0].proc.kill();
        let kill_unix = unix_now();
        let mut expiry_unix = expiry(&lease("s1").unwrap_or(last));
        let mut count_changed = Vec::new();
        for a in &agents {
            gauge_of(
                "agent known_server_count 2 after the kill",
                Duration::from_secs(45),
                agent_scrape(a),
                "konnectivity_network_proxy_agent_known_server_count",
                2.0,
            )
            .await;
            count_changed.push(killed.elapsed());
        }
        let count_unix = kill_unix
            + count_changed
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64();
        assert!(
            killed.elapsed() <= Duration::from_secs(45),
            "the agents must count 2 within 45 s of the kill, took {:?}",
            killed.elapsed()
        );
        poll_until(
            "the expired lease of s1 to be collected",
            Duration::from_secs(30),
            || async {
                match lease("s1") {
                    None => Ok(()),
                    Some(l) => Err(format!("still there: {l}")),
                }
            },
        )
        .await;
        let collected = killed.elapsed();
        if let Some(l) = lease("s1") {
            expiry_unix = expiry(&l);
        }
        for a in &agents {
            gauge_of(
                "agent holds the 2 live tunnels",
                Duration::from_secs(10),
                agent_scrape(a),
                names::AGENT_OPEN_SERVERS,
                2.0,
            )
            .await;
        }
        let culled: f64 = {
            let mut n = 0.0;
            for s in &servers[1..] {
                n += s
                    .metrics()
                    .await
                    .expect("metrics")
                    .get("konnectivity_network_proxy_server_culled_leases_count")
                    .unwrap_or(0.0);
            }
            n
        };
        assert!(culled >= 1.0, "a surviving server counts the culled lease");

        // s1 comes back: its lease appears and the agents connect to it within a sync interval.
        let restarted = Instant::now();
        servers[0].proc.restart();
        servers[0].wait_healthy().await;
        // Healthy means listening; the lease is published right after.
        let healthy = restarted.elapsed();
        poll_until("the lease of s1 again", Duration::from_secs(10), || async {
            lease("s1")
                .map(|_| ())
                .ok_or_else(|| "no lease yet".to_string())
        })
        .await;
        for a in &agents {
            gauge_of(
                "agent holds 3 tunnels again",
                Duration::from_secs(15),
                agent_scrape(a),
                names::AGENT_OPEN_SERVERS,
                3.0,
            )
            .await;
        }
        let reconnect = restarted.elapsed().saturating_sub(healthy);
        gauge_of(
            "s1 holds both agents again",
            Duration::from_secs(10),
            server_scrape(&servers[0]),
            names::SERVER_READY_BACKENDS,
            2.0,
        )
        .await;

        stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for l in load {
            errors.extend(l.await.expect("load task"));
        }
        let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        println!(
            "HA timings: lease expiry -> agents count 2: {:.1} s (kill -> count: {:?}, per agent {:?}); \
             kill -> lease collected: {:?}; s1 healthy again -> agents hold 3 tunnels: {:?} (sync interval {:?}); \
             dials through the other two: {ok} ok, {failed} failed",
            count_unix - expiry_unix,
            count_changed.iter().max().copied().unwrap_or_default(),
            count_changed,
            collected,
            reconnect,
            SYNC_INTERVAL,
        );
        assert_eq!(
            failed, 0,
            "no dial may fail through the servers that stay: {errors:?}"
        );
        assert!(ok >= 20, "the dial load ran ({ok} dials)");
        // One sync interval to notice, plus the lease watch, the TLS connect and the scrape
        // polls that see it: a second interval is that slack (a 1 s bound failed by tens of ms
        // on a loaded machine).
        assert!(
            reconnect <= 2 * SYNC_INTERVAL,
            "the agents must reconnect within about one sync interval of the server's return, took {reconnect:?}"
        );
        // Upstream's agent lease metrics were counted.
        let m = agents[0].metrics().await.expect("agent metrics");
        assert!(
            m.counter(
                "konnectivity_network_proxy_agent_lease_lists_total",
                &[("http_response_code", "200")]
            ) >= 1.0,
            "lease_lists_total"
        );
        assert!(
            m.counter(
                "konnectivity_network_proxy_agent_lease_watches_total",
                &[("http_response_code", "200")]
            ) >= 1.0,
            "lease_watches_total"
        );
        // The agents only listed and watched leases.
        assert!(api
            .log()
            .iter()
            .filter(|l| l.user.ends_with(":konnectivity-agent"))
            .all(|l| l.resource == "leases" && (l.verb == "list" || l.verb == "watch")));
    }
}
