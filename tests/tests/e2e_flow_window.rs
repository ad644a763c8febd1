//! The per-connection flow-control window grows only when the link, not the reader, is what
//! limits a connection. The real spoke-server (HTTP CONNECT over a Unix socket, its window
//! cap set to 6 MiB) faces a fake agent that speaks Spoke credits on the wire: it sends DATA
//! within the credit it holds and reports `blocked` (a `SPOKE_CREDIT` with `blocked` set)
//! when it has none left, as spoke-agent does.
//!
//! - The client stops reading: the server's inbox fills, `blocked` grows nothing.
//! - The client reads everything: credit comes back a quarter window at a time, and
//!   `blocked` doubles the window (4 → 6 MiB here: the cap), granting the difference at once.
//! - At the cap, `blocked` grows nothing.

use std::time::Duration;

use spoke_proto::packet::Payload;
use spoke_proto::{Credit, DialResponse, Packet, PacketType};
use spoke_tests::cluster::{Env, Mode, ServerOpts, Transport};
use spoke_tests::connect;
use spoke_tests::grpc::{self, PacketStream};
use spoke_tests::BoxIo;
use tokio::io::AsyncReadExt;

const MIB: i64 = 1 << 20;
/// What spoke-server advertises (its initial window) when its cap is larger.
const INITIAL: i64 = 4 * MIB;
const CAP: i64 = 6 * MIB;
const CONNECT_ID: i64 = 77;
const CHUNK: usize = 64 * 1024;
/// How long no more credit must come for a figure to count as final.
const QUIET: Duration = Duration::from_millis(500);

fn blocked(connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::SpokeCredit as i32,
        payload: Some(Payload::Credit(Credit {
            connect_id,
            bytes: 0,
            blocked: true,
        })),
    }
}

/// The fake agent's view of one connection: credit it holds, and what the server granted.
struct Sender {
    agent: PacketStream,
    credit: i64,
    granted: i64,
}

impl Sender {
    /// Sends `n` bytes of DATA; they must fit the credit held (a Spoke sender never exceeds it).
    async fn send(&mut self, n: i64) {
        assert!(
            n <= self.credit,
            "test bug: {n} bytes with {} credit",
            self.credit
        );
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(CHUNK);
            self.agent
                .send(grpc::data(CONNECT_ID, vec![0x5a; k]))
                .await
                .expect("send DATA");
            left -= k;
        }
        self.credit -= n;
    }

    /// Sends `n` bytes while the client reads them all; returns the client.
    async fn send_read(&mut self, mut client: BoxIo, n: i64) -> BoxIo {
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; n as usize];
            client.read_exact(&mut buf).await.map(|_| client)
        });
        self.send(n).await;
        reader
            .await
            .expect("reader task")
            .expect("the client reads what was sent")
    }

    /// Reports this connection blocked on credit, as spoke-agent does.
    async fn report_blocked(&self) {
        self.agent
            .send(blocked(CONNECT_ID))
            .await
            .expect("send blocked");
    }

    /// Takes credit packets until `expect` bytes came (for at most 10 s), then for another
    /// [`QUIET`] to catch any more; returns what they granted.
    async fn credits(&mut self, expect: i64) -> i64 {
        let mut got = 0;
        let start = tokio::time::Instant::now();
        let mut deadline = start + Duration::from_secs(10);
        loop {
            if got >= expect && deadline > tokio::time::Instant::now() + QUIET {
                deadline = tokio::time::Instant::now() + QUIET;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return got;
            }
            match self.agent.recv(left).await {
                Ok(Some(p)) => match p.payload {
                    Some(Payload::Credit(c)) if c.connect_id == CONNECT_ID => {
                        assert!(!c.blocked, "the server reported itself blocked: {c:?}");
                        assert!(c.bytes > 0, "an empty grant: {c:?}");
                        got += c.bytes;
                        self.credit += c.bytes;
                        self.granted += c.bytes;
                    }
                    other => panic!("unexpected packet from the server: {other:?}"),
                },
                Ok(None) => panic!("the server ended the agent stream"),
                Err(_) => return got,
            }
        }
    }
}

#[tokio::test]
async fn the_window_grows_only_while_the_reader_keeps_up() {
    let env = Env::new("flow_window");
    let server = env
        .server(
            ServerOpts::new(Mode::HttpConnect, Transport::Uds)
                .arg(&format!("--max-connection-buffer-bytes={CAP}")),
        )
        .await;
    let channel = grpc::tls_channel(
        server.agent_addr,
        env.tls_client(Some(&env.pki.main.agent), &[b"h2"]),
    )
    .await
    .expect("agent channel");
    // The value spoke-agent sends: its own initial window.
    let mut agent = PacketStream::agent_with(
        channel,
        "fake-agent",
        "",
        &[("spoke-flow-control", &INITIAL.to_string())],
    )
    .await
    .expect("Connect as a fake agent");
    let advertised = agent
        .headers
        .get("spoke-flow-control")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    assert_eq!(
        advertised,
        Some(INITIAL),
        "the server must advertise its initial window, not its cap"
    );
    server.wait_agent_streams(1).await;

    // A client CONNECTs; the fake agent answers the dial.
    let target = "127.0.0.1:9".to_string();
    let frontend = server.frontend.clone();
    let client = tokio::spawn(async move { connect::tunnel(&frontend, &target).await });
    let dial = agent
        .recv_until(PacketType::DialReq, Duration::from_secs(10), |_| {})
        .await
        .expect("DIAL_REQ for the client's CONNECT");
    let Some(Payload::DialRequest(req)) = dial.payload else {
        panic!("DIAL_REQ without its payload");
    };
    agent
        .send(Packet {
            r#type: PacketType::DialRsp as i32,
            payload: Some(Payload::DialResponse(DialResponse {
                random: req.random,
                connect_id: CONNECT_ID,
                error: String::new(),
            })),
        })
        .await
        .expect("DIAL_RSP");
    let mut client = client
        .await
        .expect("client task")
        .expect("CONNECT established");
    let mut sender = Sender {
        agent,
        credit: INITIAL,
        granted: 0,
    };

    // 1. The client reads nothing. The server drains what the Unix socket's buffers take
    //    (credit for that comes back), then the rest waits in its inbox. Blocked now: the
    //    reader is behind, so the window stays and no more credit comes.
    sender.send(INITIAL).await;
    let drained = sender.credits(0).await;
    assert!(
        drained < INITIAL / 2,
        "{drained} bytes credited although the client read nothing"
    );
    sender.report_blocked().await;
    let got = sender.credits(0).await;
    assert_eq!(
        got, 0,
        "{got} bytes of credit after blocked while the client read nothing: the window grew \
         for a stalled reader"
    );

    // 2. The client reads everything: credit for all of it comes back, a quarter window at a
    //    time, and nothing more.
    let mut buf = vec![0u8; INITIAL as usize];
    client
        .read_exact(&mut buf)
        .await
        .expect("the client reads what was sent");
    let got = sender.credits(INITIAL - drained).await;
    assert_eq!(
        drained + got,
        INITIAL,
        "credit returned for {INITIAL} drained bytes"
    );

    // 3. The sender spends it all with the client keeping up, and is blocked again: now the
    //    window doubles, capped at 6 MiB, and the growth is granted at once.
    let client = sender.send_read(client, INITIAL).await;
    let got = sender.credits(INITIAL).await;
    assert_eq!(got, INITIAL, "credit returned for the second window");
    sender.report_blocked().await;
    let got = sender.credits(CAP - INITIAL).await;
    assert_eq!(
        got,
        CAP - INITIAL,
        "blocked with the reader keeping up: the window should grow to the cap"
    );

    // 4. The larger window is usable: the sender spends all 6 MiB, the client reads it, the
    //    credit comes back in quarters of the new window. At the cap, blocked grows nothing.
    assert_eq!(sender.credit, CAP);
    let _client = sender.send_read(client, CAP).await;
    let got = sender.credits(CAP).await;
    assert_eq!(got, CAP, "credit returned for the grown window");
    sender.report_blocked().await;
    let got = sender.credits(0).await;
    assert_eq!(got, 0, "the window grew past its cap");
    assert_eq!(sender.granted, INITIAL + INITIAL + (CAP - INITIAL) + CAP);
}
