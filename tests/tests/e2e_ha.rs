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
