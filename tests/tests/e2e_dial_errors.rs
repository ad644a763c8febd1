//! Destination dial failures through HTTP CONNECT: refused → 502, filtered → 504 after the agent's
//! dial timeout (inside a private network namespace with an nftables SYN drop).

use std::time::Duration;

use spoke_tests::backends;
use spoke_tests::cluster::{wait_tables_empty, Env, Mode, ServerOpts, Transport};
use spoke_tests::curl::{self, CurlProxy};
use spoke_tests::metrics::names;
use spoke_tests::netns::{require_root, NetNs};

#[tokio::test]
async fn curl_to_closed_port_gets_502() {
    let env = Env::new("refused_502");
    let (server, agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Tls), |a| a)
        .await;
    let (_reserved, closed) = backends::refusing_port();
    let proxy = CurlProxy::Tls(
        server.tcp.unwrap(),
        &env.pki.main,
        Some(&env.pki.main.frontend),
    );
    let out = curl::run(&proxy, &format!("http://{closed}/"))
        .await
        .unwrap();
    assert_eq!(out.connect_code, 502, "CONNECT to a closed port: {out:?}");
    assert_ne!(out.exit_code, Some(0), "curl must fail: {out:?}");
    wait_tables_empty(&server, &[&agent]).await;
    let m = server.metrics().await.unwrap();
    assert!(
        m.counter(names::SERVER_DIAL_FAILURES, &[("reason", "error_response")]) >= 1.0,
        "dial_failure_count{{reason=error_response}} not counted; present: {:?}",
        m.names()
    );
}

/// Port inside the namespace whose SYNs are dropped.
const FILTERED_PORT: u16 = 9;
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

#[test]
fn filtered_destination_gets_504_after_agent_dial_timeout_in_netns() {
    if !require_root(
        "filtered_destination_gets_504_after_agent_dial_timeout_in_netns",
        "root (network namespaces, nftables)",
        &[],
    ) {
        return;
    }
    let ns = NetNs::create("filtered").expect("create network namespace");
    ns.drop_syns_to(FILTERED_PORT).expect("nft rule");
    ns.block_on(|| async {
        let env = Env::new("filtered_504");
        let timeout_flag = format!("--dial-timeout={}s", DIAL_TIMEOUT.as_secs());
        let (server, agent) = env
            .pair(ServerOpts::new(Mode::HttpConnect, Transport::Tls), |a| {
                a.arg(&timeout_flag)
            })
            .await;
        let proxy = CurlProxy::Tls(
            server.tcp.unwrap(),
            &env.pki.main,
            Some(&env.pki.main.frontend),
        );

        let out = curl::run(&proxy, &format!("http://127.0.0.1:{FILTERED_PORT}/"))
            .await
            .unwrap();
        assert_eq!(
            out.connect_code, 504,
            "CONNECT to a filtered address: {out:?}"
        );
        assert!(
            out.elapsed >= DIAL_TIMEOUT - Duration::from_millis(100)
                && out.elapsed < Duration::from_secs(4),
            "504 must come after the 1 s agent dial timeout (not the 5 s default), took {:?}",
            out.elapsed
        );
        // In the namespace nothing listens anywhere: a refused dial is certain.
        let out = curl::run(&proxy, "http://127.0.0.1:1/").await.unwrap();
        assert_eq!(out.connect_code, 502, "CONNECT to a closed port: {out:?}");
        wait_tables_empty(&server, &[&agent]).await;
        let m = agent.metrics().await.unwrap();
        assert!(
            m.counter(names::AGENT_DIAL_FAILURES, &[("reason", "timeout")]) >= 1.0,
            "endpoint_dial_failure_total{{reason=timeout}} not counted; present: {:?}",
            m.names()
        );
    });
}
