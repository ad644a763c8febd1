//! A fleet of 500 simulated agents (each its own mTLS connection and Connect stream) on one
//! spoke-server: the agent registry's work per operation must not grow with the fleet. This
//! fails an O(N) step in registration, removal or routing by a count of operations (the
//! server's `spoke_server_registry_*` counters: entries visited per add, remove and pick),
//! never by time.
use std::time::Duration;

use spoke_tests::cluster::{Env, Mode, ServerOpts, Transport};
use spoke_tests::fleet::{agent_host, connect_dial, Fleet, FleetConfig};

const SMALL: usize = 50;
const LARGE: usize = 500;
const DIALS: usize = 100;
const OPS: &str = "spoke_server_registry_operations_total";
const STEPS: &str = "spoke_server_registry_steps_total";

#[derive(Clone, Copy, Debug)]
struct Work {
    ops: f64,
    steps: f64,
}

impl std::ops::Sub for Work {
    type Output = Work;
    fn sub(self, o: Work) -> Work {
        Work {
            ops: self.ops - o.ops,
            steps: self.steps - o.steps,
        }
    }
}

impl Work {
    fn per_op(self) -> f64 {
        self.steps / self.ops.max(1.0)
    }
}

async fn work(server: &spoke_tests::cluster::Server) -> Work {
    let m = server.metrics().await.expect("scrape");
    Work {
        ops: m.get(OPS).expect(OPS),
        steps: m.get(STEPS).expect(STEPS),
    }
}

async fn dials(uds: &std::path::Path, agents: usize) {
    for i in 0..DIALS {
        // Every other dial by name (destHost), the rest to any agent (default).
        let target = if i % 2 == 0 {
            format!("{}:10250", agent_host("node-", (i * 7919) % agents))
        } else {
            "unnamed.fleet:443".to_string()
        };
        connect_dial(uds, &target)
            .await
            .unwrap_or_else(|e| panic!("dial {target}: {e:#}"));
    }
}

fn flat(what: &str, small: Work, large: Work) {
    let (a, b) = (small.per_op(), large.per_op());
    println!("{what}: {a:.2} steps per operation with {SMALL} agents, {b:.2} with {LARGE}");
    assert!(
        small.ops > 0.0 && large.ops > 0.0,
        "{what}: no operations counted"
    );
    // Flat: within 1.2× (plus one step for rounding on tiny counts). An O(N) step would visit
    // ~10× more entries per operation at 500 agents than at 50.
    assert!(
        b <= a * 1.2 + 1.0,
        "{what}: registry work per operation grew with the fleet: {a:.2} → {b:.2} steps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_work_per_agent_stays_flat_from_50_to_500_agents() {
    spoke_tests::ports::raise_nofile_limit();
    let env = Env::new("e2e_fleet");
    let server = env
        .server(
            ServerOpts::new(Mode::HttpConnect, Transport::Uds)
                .arg("--proxy-strategies=destHost,default"),
        )
        .await;
    let uds = server.uds.clone().expect("uds");
    let tls =
        spoke_tests::tls::client_config(&env.pki.main.ca_pem, Some(&env.pki.main.agent), &[b"h2"]);
    let cfg = FleetConfig::new(server.agent_addr, tls);
    let timeout = Duration::from_secs(120);

    let w0 = work(&server).await;
    let small = Fleet::start(cfg.clone(), SMALL);
    small
        .wait_complete(SMALL as u64, timeout)
        .await
        .expect("small fleet");
    server.wait_agent_streams(SMALL).await;
    let w1 = work(&server).await;
    dials(&uds, SMALL).await;
    let w2 = work(&server).await;

    let large = Fleet::start(
        FleetConfig {
            first: SMALL,
            ..cfg.clone()
        },
        LARGE - SMALL,
    );
    large
        .wait_complete((LARGE - SMALL) as u64, timeout)
        .await
        .expect("large fleet");
    server.wait_agent_streams(LARGE).await;
    let w3 = work(&server).await;
    dials(&uds, LARGE).await;
    let w4 = work(&server).await;
    assert!(
        large.stats.dials.load(std::sync::atomic::Ordering::Relaxed)
            + small.stats.dials.load(std::sync::atomic::Ordering::Relaxed)
            >= 2 * DIALS as u64,
        "the fleet answered fewer dials than were made"
    );

    // Removal: the last 50 agents leave while 450 stay, then the first 50 with nobody else.
    drop(large);
    server.wait_agent_streams(SMALL).await;
    let w5 = work(&server).await;
    drop(small);
    server.wait_agent_streams(0).await;
    let w6 = work(&server).await;

    flat("registration", w1 - w0, w3 - w2);
    flat("routing", w2 - w1, w4 - w3);
    flat("removal", w6 - w5, w5 - w4);
}
