//! `spoke_ebpf_*` metrics, read from the kernel's per-CPU counters at scrape time.
use std::sync::Arc;

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};
use spoke_agent_common::counter;

use super::backlog::BacklogMaps;

/// Plain counters: (metric name without `_total`, help, counter index).
const COUNTERS: &[(&str, &str, u32)] = &[
    (
        "spoke_ebpf_sockets_tracked",
        "Sockets put into the fast-path SockHash (agent backend sockets and their local peers)",
        counter::SOCKETS_TRACKED,
    ),
    (
        "spoke_ebpf_socket_pairs",
        "Agent-local legs whose payload is redirected socket to socket",
        counter::PAIRS,
    ),
    (
        "spoke_ebpf_sockets_closed",
        "Tracked sockets that closed",
        counter::SOCKETS_CLOSED,
    ),
    (
        "spoke_ebpf_redirected_messages",
        "Messages redirected straight into the peer socket by sk_msg",
        counter::MSG_REDIRECTED,
    ),
    (
        "spoke_ebpf_redirected_bytes",
        "Bytes redirected straight into the peer socket by sk_msg",
        counter::BYTES_REDIRECTED,
    ),
    (
        "spoke_ebpf_passed_messages",
        "Messages of tracked sockets left on the normal TCP path (peer not paired or closing)",
        counter::MSG_PASSED,
    ),
    (
        "spoke_ebpf_backlog_fallbacks",
        "Redirected legs whose reader fell the backlog limit behind; on the TCP path from then on",
        counter::BACKLOG_FALLBACKS,
    ),
    (
        "spoke_ebpf_pairs_refused",
        "Accepted sockets that mirrored a waiting agent socket's tuple but not its handshake (another network namespace); not paired",
        counter::PAIRS_REFUSED,
    ),
    (
        "spoke_ebpf_sockhash_errors",
        "Failures to insert a socket into the SockHash",
        counter::SOCKHASH_ERRORS,
    ),
    (
        "spoke_ebpf_backlog_wakeups_sent",
        "Reads of a redirected endpoint that reached the mark of an agent write held for it, and sent that write a wake-up",
        counter::READER_WAKEUPS,
    ),
    (
        "spoke_ebpf_backlog_wakeups_lost",
        "Wake-ups for held agent writers lost to a full ring buffer (the writer's timer took over)",
        counter::WAKE_RING_FULL,
    ),
];

/// XDP verdicts: (action, reason, counter index).
const XDP: &[(&str, &str, u32)] = &[
    ("pass", "unprotected", counter::XDP_PASS_UNPROTECTED),
    ("pass", "allowed_source", counter::XDP_PASS_ALLOWED),
    ("pass", "fragment", counter::XDP_PASS_FRAGMENT),
    ("drop", "denied_source", counter::XDP_DROP_DENIED),
    ("drop", "malformed", counter::XDP_DROP_MALFORMED),
];

/// Scrape-time view of the eBPF data plane. Holds map fds only (the counters, the backlog's
/// counts), so it never keeps programs attached.
pub struct EbpfCollector {
    pub(super) counters: Option<Arc<PerCpuArray<MapData, u64>>>,
    /// The agent's own count of writes held for a lagging reader; `Some` while the fast path runs.
    pub(super) backlog: Option<Arc<BacklogMaps>>,
    /// (program label, attached).
    pub(super) programs: Vec<(&'static str, bool)>,
}

impl std::fmt::Debug for EbpfCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfCollector")
            .field("counters", &self.counters.is_some())
            .field("backlog", &self.backlog.is_some())
            .field("programs", &self.programs)
            .finish()
    }
}

impl EbpfCollector {
    fn read(&self, index: u32) -> Option<u64> {
        let values = self.counters.as_ref()?.get(&index, 0).ok()?;
        Some(values.iter().fold(0u64, |sum, v| sum.wrapping_add(*v)))
    }
}

impl Collector for EbpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let attached = encoder.encode_descriptor(
            "spoke_ebpf_program_attached",
            "1 if the eBPF program is attached, 0 if it is off (see the status page for why)",
            None,
            MetricType::Gauge,
        )?;
        let mut attached = attached;
        for (program, on) in &self.programs {
            let labels = [("program", *program)];
            ConstGauge::new(i64::from(*on)).encode(attached.encode_family(&labels)?)?;
        }

        // Counters only exist while the programs are loaded; absent rather than zero otherwise.
        if self.counters.is_none() {
            return Ok(());
        }
        for (name, help, index) in COUNTERS {
            encode_counter(&mut encoder, name, help, self.read(*index).unwrap_or(0))?;
        }
        let mut family = encoder.encode_descriptor(
            "spoke_ebpf_xdp_packets",
            "Packets judged by the XDP guard, by action and reason",
            None,
            MetricType::Counter,
        )?;
        for (action, reason, index) in XDP {
            let labels = [("action", *action), ("reason", *reason)];
            let metric = ConstCounter::new(self.read(*index).unwrap_or(0));
            metric.encode(family.encode_family(&labels)?)?;
        }
        if let Some(backlog) = &self.backlog {
            let (holds, seconds, wakeups) = backlog.holds();
            encode_counter(
                &mut encoder,
                "spoke_ebpf_backlog_holds",
                "Agent writes to a redirected endpoint held back for its reader to catch up (instead of falling back to TCP), counted as each hold starts",
                holds,
            )?;
            encode_counter(
                &mut encoder,
                "spoke_ebpf_backlog_hold_seconds",
                "Time agent writes to redirected endpoints spent held back for their readers, counted as each hold ends",
                seconds,
            )?;
            encode_counter(
                &mut encoder,
                "spoke_ebpf_backlog_reader_wakeups",
                "Waits of held agent writes ended by a wake-up from their reader's read (the others end by a timer)",
                wakeups,
            )?;
        }
        Ok(())
    }
}

fn encode_counter<T>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: T,
) -> Result<(), std::fmt::Error>
where
    ConstCounter<T>: EncodeMetric,
{
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}
