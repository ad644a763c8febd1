//! Server restart: the agent reconnects and dials work again quickly.

use std::time::Duration;

use spoke_tests::backends;
use spoke_tests::cluster::{status, Env, Mode, ServerOpts, Transport};
use spoke_tests::connect;
use spoke_tests::wait::poll_until;

const RECOVERY: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_within_2s_after_server_sigkill_and_restart() {
    let env = Env::new("restart");
    let (mut server, mut agent) = env
        .pair(ServerOpts::new(Mode::HttpConnect, Transport::Uds), |a| a)
        .await;
    let echo = backends::echo().await;
    connect::echo_roundtrip(&server.frontend, &echo.target())
        .await
        .expect("dial before the restart");

    server.proc.kill();
    poll_until(
        "agent /readyz 503 once its only server is gone",
        Duration::from_secs(10),
        || async {
            match status(agent.health_addr, "/readyz").await? {
                503 => Ok(()),
                s => Err(format!("agent /readyz {s}")),
            }
        },
    )
    .await;

    let back = server.restart().await;
    let mut last = String::new();
    while back.elapsed() < RECOVERY {
        let left = RECOVERY.saturating_sub(back.elapsed());
        match tokio::time::timeout(
            left,
            connect::echo_roundtrip(&server.frontend, &echo.target()),
        )
        .await
        {
            Ok(Ok(())) => {
                println!(
                    "dial works {:?} after the server's port accepted again",
                    back.elapsed()
                );
                agent.proc.assert_running();
                agent.wait_ready().await;
                return;
            }
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = "dial attempt still running".into(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no successful dial within {RECOVERY:?} of the restarted server accepting; last: {last}"
    );
}
