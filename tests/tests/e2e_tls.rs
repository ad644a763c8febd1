//! mTLS is enforced: on the agent port in both directions, and on the TCP frontend.

use std::time::Duration;

use spoke_tests::backends;
use spoke_tests::cluster::{status, AgentOpts, Env, Mode, ServerOpts, Transport};
use spoke_tests::connect::{self, Frontend};
use spoke_tests::curl::{self, CurlProxy};
use spoke_tests::metrics::names;
use spoke_tests::wait::holds_for;

const REFUSAL_WINDOW: Duration = Duration::from_secs(3);

/// For `REFUSAL_WINDOW`: server /readyz 500, agent /readyz 503, no backend registered.
async fn assert_never_connected(
    server: &spoke_tests::cluster::Server,
    agent: &spoke_tests::cluster::Agent,
) {
    holds_for(
        "server and agent to stay unready",
        REFUSAL_WINDOW,
        || async {
            let (s, a) = (
                status(server.health_addr, "/readyz").await?,
                status(agent.health_addr, "/readyz").await?,
            );
            if (s, a) != (500, 503) {
                return Err(format!(
                    "server /readyz {s} (want 500), agent /readyz {a} (want 503)"
                ));
            }
            let m = server.metrics().await.map_err(|e| format!("{e:#}"))?;
            match m.get(names::SERVER_READY_BACKENDS) {
                Some(0.0) => Ok(()),
                other => Err(format!("ready_backend_connections = {other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn agent_cert_from_foreign_ca_is_refused() {
    let env = Env::new("rogue_agent");
    let mut server = env
        .server(ServerOpts::new(Mode::HttpConnect, Transport::Uds))
        .await;
    let mut rogue = env
        .agent(
            AgentOpts::new(server.agent_addr)
                .cert(env.pki.rogue.agent.clone())
                .id("rogue-agent"),
        )
        .await;
    assert_never_connected(&server, &rogue).await;
    rogue.proc.assert_running();
    // Control: the same server accepts a correctly signed agent.
    let mut good = env
        .agent(AgentOpts::new(server.agent_addr).id("good-agent"))
        .await;
    good.wait_ready().await;
    server.wait_ready().await;
}

#[tokio::test]
async fn server_cert_from_foreign_ca_is_refused_by_agent() {
    let env = Env::new("rogue_server");
    let mut server = env
        .server(
            ServerOpts::new(Mode::HttpConnect, Transport::Uds)
                .cluster_cert(env.pki.rogue.server.clone()),
        )
        .await;
    let agent = env.agent(AgentOpts::new(server.agent_addr)).await;
    assert_never_connected(&server, &agent).await;
    // Control: an agent that trusts the rogue CA (same client cert) gets through.
    let mut trusting = env
        .agent(
            AgentOpts::new(server.agent_addr)
                .ca(env.pki.rogue.ca.clone())
                .id("trusting-agent"),
        )
        .await;
    trusting.wait_ready().await;
    server.wait_ready().await;
}

#[tokio::test]
async fn tcp_frontend_requires_a_client_cert_from_its_ca() {
    let env = Env::new("frontend_mtls");
    let (server, _agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Tls), |a| a)
        .await;
    let backend = backends::http().await;
    let addr = server.tcp.unwrap();
    let url = format!("http://{}/bytes/100?seed=1", backend.addr);
    let main = &env.pki.main;

    // Raw client without a certificate: TLS may complete on the client side (TLS 1.3), but no
    // CONNECT may be answered.
    let no_cert = Frontend::Tls(addr, env.tls_client(None, &[]));
    match connect::connect(&no_cert, &backend.target()).await {
        Ok((reply, _)) => panic!(
            "CONNECT without a client certificate was answered: {}",
            reply.head
        ),
        Err(e) => println!("no-cert client refused as expected: {e:#}"),
    }
    let rogue = Frontend::Tls(addr, env.tls_client(Some(&env.pki.rogue.frontend), &[]));
    if let Ok((reply, _)) = connect::connect(&rogue, &backend.target()).await {
        panic!(
            "CONNECT with a certificate from a foreign CA was answered: {}",
            reply.head
        );
    }
    for (what, cert) in [
        ("no client cert", None),
        ("foreign client cert", Some(&env.pki.rogue.frontend)),
    ] {
        let out = curl::run(&CurlProxy::Tls(addr, main, cert), &url)
            .await
            .unwrap();
        assert!(
            out.connect_code != 200 && out.exit_code != Some(0),
            "curl with {what} got through: {out:?}"
        );
    }
    assert_eq!(
        backend.stats.snapshot().0,
        0,
        "a refused client reached the destination"
    );

    // Control: the right certificate works.
    let out = curl::run(&CurlProxy::Tls(addr, main, Some(&main.frontend)), &url)
        .await
        .unwrap();
    assert_eq!(
        (out.connect_code, out.http_code, out.exit_code),
        (200, 200, Some(0)),
        "with the frontend cert: {out:?}"
    );
}
