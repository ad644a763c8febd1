//! A session on an HTTP/2 gRPC stream: what arrives is dispatched inline, what the session
//! queues is sent as the stream's window allows.
use super::{End, Session};
use crate::http2::driver::{Ended, StreamEnd};
use crate::outbound::OutboundRx;
use futures::Stream;
use spoke_proto::Packet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Code;

/// Called once when the stream is over, with how it ended.
pub type OnEnd = Box<dyn FnOnce(&Ended) + Send>;

pub struct SessionEnd<E: End> {
    pub session: Arc<Session<E>>,
    out: OutboundRx,
    on_end: Option<OnEnd>,
}

impl<E: End> SessionEnd<E> {
    pub fn new(session: Arc<Session<E>>, out: OutboundRx, on_end: Option<OnEnd>) -> Self {
        SessionEnd {
            session,
            out,
            on_end,
        }
    }
}

impl<E: End> StreamEnd for SessionEnd<E> {
    fn packet(&mut self, p: Packet, _: usize) -> Result<(), (Code, String)> {
        self.session.receive(p);
        Ok(())
    }

    fn poll_packet(&mut self, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        Pin::new(&mut self.out).poll_next(cx)
    }

    fn ended(&mut self, how: &Ended) {
        let m = &self.session.metrics;
        if let Ended::Status(code, _) = how {
            if *code != Code::Ok {
                m.stream.error(m.received, *code, None);
            }
        }
        self.session.outbound.closed.cancel();
        if let Some(f) = self.on_end.take() {
            f(how);
        }
    }
}
