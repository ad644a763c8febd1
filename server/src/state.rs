//! What every part of the server shares.
use crate::backends::{Backend, Backends, DialOutcome};
use crate::metrics::ServerMetrics;
use crate::options::Options;
use spoke_tunnel::packet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

pub struct State {
    pub opts: Options,
    pub backends: Backends,
    pub metrics: ServerMetrics,
    /// Set on SIGTERM: no new dials, not ready, open connections may finish.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// Agent token authentication (TokenReview), when configured.
    pub auth: Option<crate::auth::TokenAuth>,
}

/// Why a dial did not produce a connection, with upstream's HTTP CONNECT status.
#[derive(Debug)]
pub enum DialError {
    NoAgent,
    Agent(String),
    Timeout,
    BackendGone,
    /// A limit of this server; the text names it.
    Limit(&'static str),
    ShuttingDown,
}

impl DialError {
    pub fn message(&self) -> String {
        match self {
            DialError::NoAgent => "No agent available".into(),
            DialError::Agent(e) => e.clone(),
            DialError::Timeout => "timed out waiting for backend dial".into(),
            DialError::BackendGone => "Backend context error".into(),
            DialError::Limit(what) => format!("server limit reached: {what}"),
            DialError::ShuttingDown => "server is shutting down".into(),
        }
    }

    /// Upstream maps the agent's dial error text: timeouts 504, fd exhaustion 503, rest 502.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::NoAgent => 500,
            DialError::Timeout => 504,
            DialError::BackendGone => 502,
            DialError::Limit(_) | DialError::ShuttingDown => 503,
            DialError::Agent(e) => {
                let e = e.to_ascii_lowercase();
                if e.contains("timeout")
                    || e.contains("timed out")
                    || e.contains("deadline exceeded")
                {
                    504
                } else if e.contains("too many open files") || e.contains("limit reached") {
                    503
                } else {
                    502
                }
            }
        }
    }
}

/// A dial in flight: dropping it before completion cancels it toward the agent.
pub struct Dial {
    pub backend: Arc<Backend>,
    pub random: i64,
    rx: Option<oneshot::Receiver<DialOutcome>>,
    state: Arc<State>,
}

impl State {
    /// Picks an agent and sends it the DIAL_REQ.
    pub fn start_dial(self: &Arc<Self>, address: &str, random: i64) -> Result<Dial, DialError> {
        self.admit()?;
        let Some(backend) = self.backends.pick(address) else {
            self.metrics.dial_failure("no_agent");
            return Err(DialError::NoAgent);
        };
        let (tx, rx) = oneshot::channel();
        if !backend.start_dial(random, packet::dial_req(address.to_string(), random), tx) {
            self.metrics.dial_failure("send_rsp");
            return Err(DialError::BackendGone);
        }
        self.metrics.pending_backend_dials.inc();
        tracing::debug!(address, random, agent_id = %backend.agent_id, "dial sent to agent");
        Ok(Dial {
            backend,
            random,
            rx: Some(rx),
            state: self.clone(),
        })
    }
}

impl State {
    /// Refuses new work past a limit (existing connections are unaffected).
    fn admit(&self) -> Result<(), DialError> {
        let m = &self.metrics;
        let o = &self.opts;
        let refused = if self
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(DialError::ShuttingDown);
        } else if m.established_connections.get() as usize >= o.max_connections {
            Some(("limit_connections", "--max-connections"))
        } else if m.pending_backend_dials.get() as usize >= o.max_pending_dials {
            Some(("limit_pending_dials", "--max-pending-dials"))
        } else if m.relay.buffered_bytes.get() as usize >= o.max_buffered_bytes {
            Some(("limit_buffered_bytes", "--max-buffered-bytes"))
        } else {
            None
        };
        match refused {
            Some((reason, flag)) => {
                m.reject(reason);
                tracing::warn!(limit = flag, "refusing a new dial: limit reached");
                Err(DialError::Limit(flag))
            }
            None => Ok(()),
        }
    }
}

impl Dial {
    /// Waits for the agent's answer, bounded by `--backend-dial-timeout` when set.
    pub async fn outcome(&mut self) -> Result<(i64, spoke_tunnel::relay::ConnParts), DialError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(DialError::BackendGone);
        };
        let timeout = self.state.opts.backend_dial_timeout;
        let answer = if timeout > Duration::ZERO {
            match tokio::time::timeout(timeout, rx).await {
                Ok(a) => a,
                Err(_) => {
                    self.state.metrics.dial_failure("backend_dial_timeout");
                    return Err(DialError::Timeout);
                }
            }
        } else {
            rx.await
        };
        self.rx = None;
        self.state.metrics.pending_backend_dials.dec();
        match answer {
            Ok(DialOutcome::Established { connect_id, parts }) => Ok((connect_id, parts)),
            Ok(DialOutcome::Failed(e)) => Err(DialError::Agent(e)),
            Err(_) => Err(DialError::BackendGone),
        }
    }
}

impl Drop for Dial {
    fn drop(&mut self) {
        if self.rx.is_some() {
            // Abandoned (client gone, timeout): forget it and tell the agent to stop.
            self.state.metrics.pending_backend_dials.dec();
            if self.backend.take_pending(self.random).is_some() {
                self.state.metrics.dial_failure("frontend_close");
            }
            let _ = self.backend.outbound.control(packet::dial_cls(self.random));
        }
    }
}
