//! Writes the seed corpus (`fuzz/seeds/<target>/`): well-formed conversations that take
//! the fuzzer straight into established connections. `cargo run --example seeds`.
use bytes::Bytes;
use spoke_proto::packet::Payload;
use spoke_proto::{DialRequest, Packet, PacketType};
use spoke_tunnel::packet;
use std::path::Path;
use tonic_prost::prost::Message;

/// Operation 0 of the packet targets: a wire packet.
fn wire(p: Packet) -> Vec<u8> {
    let b = p.encode_to_vec();
    let mut v = vec![0];
    v.extend_from_slice(&(b.len() as u16).to_le_bytes());
    v.extend(b);
    v
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn main() {
    // Server (`packets_server`), with credits (cap 36, peer window 1) and without (cap 22).
    for (name, cfg) in [("server-credits", 0x25u8), ("server-plain", 0x03)] {
        let mut s = vec![cfg];
        s.extend([3, 5]); // a frontend dials random 5
        s.extend([10, 4]); // the agent reads the DIAL_REQ
        s.extend(wire(packet::dial_ok(5, 7)));
        s.extend([5, 0]); // the frontend takes connection 7 and starts its relay
        s.extend(wire(packet::data(7, Bytes::from_static(b"hello"))));
        s.extend(wire(packet::data(7, Bytes::from(vec![b'x'; 40])))); // past the cap
        s.extend([6, 0, 0, 3]); // the relay drains 3 chunks
        s.extend(wire(packet::credit(7, 100)));
        s.extend([6, 1, 0, 50, 0]); // the relay reads 50 bytes from its frontend
        s.extend([10, 8]);
        s.extend(wire(packet::close_rsp(7, "")));
        s.extend([6, 3, 0]); // the relay sees the close
        s.extend([3, 6]);
        s.extend(wire(packet::dial_err(6, "dial tcp: refused".into())));
        s.extend([5, 0]); // the frontend takes the failure
        s.extend([3, 8, 4, 0, 0]); // dial 8, and its frontend gives up (abandon_dial)
        s.extend([3, 9, 4, 0, 1]); // dial 9, dropped while the answer is on its way
        s.extend(wire(packet::dial_ok(9, 11))); // nobody takes it: CLOSE_REQ
        s.extend([3, 10, 3, 10]); // a second dial under pending id 10 is refused
        s.extend(wire(packet::dial_cls(10))); // the agent cancels dial 10
        s.extend([4, 0, 0]); // its frontend hangs up before reading the failure
        s.extend([3, 12]);
        s.extend(wire(packet::dial_ok(12, 13)));
        s.extend([5, 0, 6, 2, 0]); // connection 13 starts and its frontend goes away
        s.extend(wire(packet::data(13, Bytes::from_static(b"late")))); // unknown now
        s.extend(wire(packet::dial_ok(99, 14))); // answers no dial
        s.extend([3, 15, 10, 20]); // dial 15 is pending when the stream ends
        s.extend(wire(packet::drain()));
        write("packets_server", name, &s);
    }
    // Agent (`packets_agent`): dials served, refused, cancelled, failed; data both ways.
    for (name, cfg) in [("agent-credits", 0x65u8), ("agent-plain", 0x02)] {
        let mut a = vec![cfg];
        a.extend(wire(packet::dial_req("10.0.0.1:10250".into(), 9)));
        a.extend(wire(packet::dial_req("10.0.0.1:10250".into(), 9))); // duplicate id
        a.extend([3, 0, 1]); // dial 9 connects: connection 1
        a.extend(wire(packet::data(
            1,
            Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
        )));
        a.extend([4, 0, 0, 2]); // the relay drains 2 chunks
        a.extend(wire(packet::credit(1, 64)));
        a.extend([4, 1, 0, 20, 0]); // the relay reads 20 bytes from its endpoint
        a.extend([9, 8]); // the server reads
        a.extend(wire(packet::close_req(1)));
        a.extend([4, 3, 0]); // the relay sees the close
        a.extend(wire(packet::dial_req("10.0.0.2:22".into(), 10)));
        a.extend(wire(packet::dial_cls(10)));
        a.extend([3, 0, 1]); // dial 10 connects as it is cancelled: nothing to answer
        a.extend(wire(packet::dial_req("10.0.0.2:22".into(), 10)));
        a.extend([3, 0, 0]); // the new dial 10 fails
        a.extend(wire(packet::data(99, Bytes::new()))); // unknown connection
        a.extend([10]); // the agent's limits are reached
        a.extend(wire(packet::dial_req("10.0.0.3:443".into(), 11))); // refused
        a.extend([10]);
        a.extend(wire(Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(DialRequest {
                protocol: "udp".into(),
                address: "10.0.0.3:53".into(),
                random: 12,
            })),
        }));
        a.extend(wire(packet::dial_req("10.0.0.1:10250".into(), 13)));
        a.extend([3, 0, 1, 4, 2, 0]); // connection 2 opens and its endpoint closes it
        a.extend(wire(packet::dial_req("10.0.0.1:10250".into(), 14))); // pending at the end
        write("packets_agent", name, &a);
    }
    let heads: [&[u8]; 5] = [
        b"CONNECT 10.0.0.1:10250 HTTP/1.1\r\nHost: 10.0.0.1:10250\r\nUser-Agent: kube-apiserver\r\n\r\n",
        b"CONNECT [fd00::5]:443 HTTP/1.1\r\n\r\nearly bytes",
        b"CONNECT  HTTP/1.1\r\nHost: node1:80\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT node1 HTTP/1.0\r\n\r\n",
    ];
    for (i, h) in heads.iter().enumerate() {
        let mut v = vec![7];
        v.extend_from_slice(h);
        write("http_connect", &format!("head-{i}"), &v);
    }
    // HTTP/2: grpc-go's request with a socket-path authority (literal header fields),
    // padded/prioritised HEADERS split over a CONTINUATION, then DATA.
    let literal = |fields: &[(&str, &str)]| {
        let mut b = Vec::new();
        for (n, v) in fields {
            b.push(0x00);
            b.push(n.len() as u8);
            b.extend(n.as_bytes());
            b.push(v.len() as u8);
            b.extend(v.as_bytes());
        }
        b
    };
    let frame = |kind: u8, flags: u8, stream: u8, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags, 0, 0, 0, stream]);
        f.extend(payload);
        f
    };
    let block = literal(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/ProxyService/Proxy"),
        (
            ":authority",
            "/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
        ),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    let mut plain = vec![1, 0];
    plain.extend(frame(4, 0, 0, &[]));
    plain.extend(frame(1, 4, 1, &block));
    plain.extend(frame(0, 0, 1, &[0, 0, 0, 0, 2, 8, 0]));
    write("http2", "grpc-go-socket-path", &plain);
    let mut split = vec![3, 0];
    let mut padded = vec![2, 0, 0, 0, 0, 16];
    padded.extend(&block[..20]);
    padded.extend([0, 0]);
    split.extend(frame(1, 0x28, 3, &padded));
    split.extend(frame(9, 4, 3, &block[20..]));
    write("http2", "padded-continuation", &split);

    // `hpack`: the request blocks of RFC 7541 C.3 (plain) and C.4 (Huffman), and every real
    // client's HEADERS blocks from the conformance fixtures.
    let hpack_seed = |blocks: &[Vec<u8>]| {
        let mut s = vec![64]; // a 4096-byte table
        for b in blocks {
            s.extend((b.len() as u16).to_le_bytes());
            s.extend(b);
        }
        s
    };
    for (name, blocks) in [
        (
            "rfc7541-c3",
            [
                "828684410f7777772e6578616d706c652e636f6d",
                "828684be58086e6f2d6361636865",
                "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
            ],
        ),
        (
            "rfc7541-c4",
            [
                "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                "828684be5886a8eb10649cbf",
                "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
            ],
        ),
    ] {
        let blocks: Vec<Vec<u8>> = blocks.iter().map(|h| hex(h)).collect();
        write("hpack", name, &hpack_seed(&blocks));
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/real-clients");
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // `c <hex>` frames of type 1 (HEADERS), without their 9-byte frame head.
        let blocks: Vec<Vec<u8>> = text
            .lines()
            .filter_map(|l| l.strip_prefix("c "))
            .map(hex)
            .filter(|f| f.len() > 9 && f[3] == 1)
            .map(|f| f[9..].to_vec())
            .collect();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        write("hpack", &name, &hpack_seed(&blocks));
    }

    for (i, s) in [
        "host=node1&host=node1.example.com&ipv4=10.0.0.5&ipv6=fd00::5&cidr=10.0.0.0/16&default-route=true",
        "zone=a&host=x",
        "[fd00::5]:443",
        "10.0.0.1:10250",
    ]
    .iter()
    .enumerate()
    {
        write("identifiers", &format!("ids-{i}"), format!("\x01{s}").as_bytes());
    }
    for (i, s) in [
        "\x001h0m0s",
        "\x00100ms",
        "\x001.5µs",
        "\x01[h2,http/1.1]",
        "\x01a, b",
        "\x024Mi",
        "\x02512Ki",
    ]
    .iter()
    .enumerate()
    {
        write("flags", &format!("flag-{i}"), s.as_bytes());
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
