//! kube-apiserver's side of the server: the frontends (gRPC `Proxy` streams and HTTP CONNECT)
//! and what they share, a dial from admission to the agent's answer.
pub mod grpc;
pub mod http_connect;

use crate::registry::AgentStream;
use crate::Server;
use spoke_tunnel::conns::ConnParts;
use spoke_tunnel::session::DialOutcome;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Why a dial did not produce a connection, with upstream's HTTP CONNECT status.
#[derive(Debug)]
pub enum DialError {
    NoAgent,
    Agent(String),
    Timeout,
    AgentGone,
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
            DialError::AgentGone => "Backend context error".into(),
            DialError::Limit(what) => format!("server limit reached: {what}"),
            DialError::ShuttingDown => "server is shutting down".into(),
        }
    }

    /// Upstream maps the agent's dial error text: timeouts 504, fd exhaustion 503, rest 502.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::NoAgent => 500,
            DialError::Timeout => 504,
            DialError::AgentGone => 502,
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

/// A dial in flight: dropping it before the answer cancels it toward the agent.
pub struct Dial {
    pub agent: Arc<AgentStream>,
    pub random: i64,
    rx: Option<oneshot::Receiver<DialOutcome>>,
    server: Arc<Server>,
}

impl Server {
    /// Admits a frontend's dial, picks an agent and sends it the DIAL_REQ.
    pub fn dial(self: &Arc<Self>, address: &str, random: i64) -> Result<Dial, DialError> {
        self.admit()?;
        let Some(agent) = self.registry.pick(address) else {
            self.metrics.dial_failure("no_agent");
            return Err(DialError::NoAgent);
        };
        let Some(rx) = agent.send_dial(random, address.to_string()) else {
            self.metrics.dial_failure("send_rsp");
            return Err(DialError::AgentGone);
        };
        self.metrics.pending_backend_dials.inc();
        tracing::debug!(address, random, agent_id = %agent.end.agent_id, "dial sent to agent");
        Ok(Dial {
            agent,
            random,
            rx: Some(rx),
            server: self.clone(),
        })
    }

    /// Refuses new work past a limit (existing connections are unaffected).
    fn admit(&self) -> Result<(), DialError> {
        let m = &self.metrics;
        let o = &self.opts;
        if self
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(DialError::ShuttingDown);
        }
        let refused = if m.established_connections.get() as usize >= o.max_connections {
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
    pub async fn outcome(&mut self) -> Result<(i64, ConnParts), DialError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(DialError::AgentGone);
        };
        let timeout = self.server.opts.backend_dial_timeout;
        let answer = if timeout > Duration::ZERO {
            match tokio::time::timeout(timeout, rx).await {
                Ok(a) => a,
                Err(_) => {
                    self.server.metrics.dial_failure("backend_dial_timeout");
                    return Err(DialError::Timeout);
                }
            }
        } else {
            rx.await
        };
        self.rx = None;
        self.server.metrics.pending_backend_dials.dec();
        match answer {
            Ok(DialOutcome::Established { connect_id, parts }) => Ok((connect_id, parts)),
            Ok(DialOutcome::Failed(e)) => Err(DialError::Agent(e)),
            Err(_) => Err(DialError::AgentGone),
        }
    }
}

impl Drop for Dial {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            // Abandoned (frontend gone, timeout): the agent stops, or its answer is undone.
            self.server.metrics.pending_backend_dials.dec();
            self.agent.abandon_dial(self.random, rx);
        }
    }
}

/// The frontend went away after its connection was established: close toward the agent,
/// unless the agent closed first.
pub async fn frontend_gone(agent: &AgentStream, id: i64) {
    if agent.conns.close(id, None) {
        let _ = agent
            .outbound
            .data(spoke_tunnel::packet::close_req(id))
            .await;
    }
}
