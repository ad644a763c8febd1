//! Constructors and names for Konnectivity packets, so call sites read as the protocol does.
use bytes::Bytes;
use spoke_proto::{
    packet::Payload, CloseDial, CloseRequest, CloseResponse, Credit, Data, DialRequest,
    DialResponse, Drain, Packet, PacketType,
};

fn packet(kind: PacketType, payload: Payload) -> Packet {
    Packet {
        r#type: kind as i32,
        payload: Some(payload),
    }
}

pub fn dial_req(address: String, random: i64) -> Packet {
    packet(
        PacketType::DialReq,
        Payload::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address,
            random,
        }),
    )
}

pub fn dial_ok(random: i64, connect_id: i64) -> Packet {
    packet(
        PacketType::DialRsp,
        Payload::DialResponse(DialResponse {
            error: String::new(),
            connect_id,
            random,
        }),
    )
}

pub fn dial_err(random: i64, error: String) -> Packet {
    packet(
        PacketType::DialRsp,
        Payload::DialResponse(DialResponse {
            error,
            connect_id: 0,
            random,
        }),
    )
}

pub fn dial_cls(random: i64) -> Packet {
    packet(
        PacketType::DialCls,
        Payload::CloseDial(CloseDial { random }),
    )
}

pub fn data(connect_id: i64, data: Bytes) -> Packet {
    packet(
        PacketType::Data,
        Payload::Data(Data {
            connect_id,
            error: String::new(),
            data,
        }),
    )
}

pub fn close_req(connect_id: i64) -> Packet {
    packet(
        PacketType::CloseReq,
        Payload::CloseRequest(CloseRequest { connect_id }),
    )
}

pub fn close_rsp(connect_id: i64, error: impl Into<String>) -> Packet {
    packet(
        PacketType::CloseRsp,
        Payload::CloseResponse(CloseResponse {
            error: error.into(),
            connect_id,
        }),
    )
}

pub fn drain() -> Packet {
    packet(PacketType::Drain, Payload::Drain(Drain {}))
}

pub fn credit(connect_id: i64, bytes: i64) -> Packet {
    packet(
        PacketType::SpokeCredit,
        Payload::Credit(Credit {
            connect_id,
            bytes,
            blocked: false,
        }),
    )
}

/// Tells the peer we have data for `connect_id` and no credit left (see `flow::Inbox::grow`).
pub fn blocked(connect_id: i64) -> Packet {
    packet(
        PacketType::SpokeCredit,
        Payload::Credit(Credit {
            connect_id,
            bytes: 0,
            blocked: true,
        }),
    )
}

/// Upstream's metric label for a packet type: the enum name, `Unknown` otherwise.
pub fn type_name(kind: i32) -> &'static str {
    match PacketType::try_from(kind) {
        Ok(PacketType::DialReq) => "DIAL_REQ",
        Ok(PacketType::DialRsp) => "DIAL_RSP",
        Ok(PacketType::CloseReq) => "CLOSE_REQ",
        Ok(PacketType::CloseRsp) => "CLOSE_RSP",
        Ok(PacketType::Data) => "DATA",
        Ok(PacketType::DialCls) => "DIAL_CLS",
        Ok(PacketType::Drain) => "DRAIN",
        Ok(PacketType::SpokeCredit) => "SPOKE_CREDIT",
        Err(_) => "Unknown",
    }
}

/// Bytes of payload a packet carries (DATA only); used for buffer and credit accounting.
pub fn payload_len(p: &Packet) -> usize {
    match &p.payload {
        Some(Payload::Data(d)) => d.data.len(),
        _ => 0,
    }
}
