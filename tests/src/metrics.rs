//! Prometheus text-format scraping and lookup.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;

/// Metric names from the reference (upstream names).
pub mod names {
    /// Server: tunnelled connections currently established.
    pub const SERVER_ESTABLISHED: &str =
        "konnectivity_network_proxy_server_established_connections";
    /// Server: dials waiting for the agent's DIAL_RSP.
    pub const SERVER_PENDING: &str = "konnectivity_network_proxy_server_pending_backend_dials";
    /// Server: connected agent streams.
    pub const SERVER_READY_BACKENDS: &str =
        "konnectivity_network_proxy_server_ready_backend_connections";
    /// Server: dial failures by reason.
    pub const SERVER_DIAL_FAILURES: &str = "konnectivity_network_proxy_server_dial_failure_count";
    /// Agent: open connections to destinations.
    pub const AGENT_OPEN_ENDPOINTS: &str =
        "konnectivity_network_proxy_agent_open_endpoint_connections";
    /// Agent: open tunnels to servers.
    pub const AGENT_OPEN_SERVERS: &str = "konnectivity_network_proxy_agent_open_server_connections";
    /// Agent: packets on its server streams by segment and type (`to_agent`/`DIAL_REQ`: dials
    /// it was asked for).
    pub const AGENT_PACKETS: &str = "konnectivity_network_proxy_agent_stream_packets_total";
    /// Agent: destination dial failures by reason.
    pub const AGENT_DIAL_FAILURES: &str =
        "konnectivity_network_proxy_agent_endpoint_dial_failure_total";
}

/// One sample: labels → value.
type Series = Vec<(BTreeMap<String, String>, f64)>;

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: BTreeMap<String, Series>,
}

impl Metrics {
    /// Parses Prometheus text exposition format (comments ignored).
    pub fn parse(text: &str) -> Self {
        let mut samples: BTreeMap<String, Series> = BTreeMap::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (name, labels, rest) = match line.find('{') {
                Some(open) => {
                    let close = line.rfind('}').unwrap_or(line.len());
                    (
                        &line[..open],
                        parse_labels(&line[open + 1..close]),
                        &line[(close + 1).min(line.len())..],
                    )
                }
                None => {
                    let (n, r) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
                    (n, BTreeMap::new(), r)
                }
            };
            if let Some(v) = rest.split_whitespace().next().and_then(parse_value) {
                samples
                    .entry(name.to_string())
                    .or_default()
                    .push((labels, v));
            }
        }
        Self { samples }
    }

    /// Value of an unlabelled (or single-series) metric; `None` if absent.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.get_labeled(name, &[])
    }

    /// Sum of the series of `name` whose labels include all of `want`; `None` if none match.
    pub fn get_labeled(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        let series = self.samples.get(name)?;
        let matching: Vec<f64> = series
            .iter()
            .filter(|(labels, _)| {
                want.iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`Metrics::get_labeled`] but treats an absent counter series as 0.
    pub fn counter(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.get_labeled(name, want).unwrap_or(0.0)
    }

    /// Metric names present (for diagnostics).
    pub fn names(&self) -> Vec<&str> {
        self.samples.keys().map(String::as_str).collect()
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(body) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = body.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &body[end.min(body.len())..];
    }
    out
}

/// Scrapes `http://addr/metrics`.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let resp = crate::http::get(addr, "/metrics").await?;
    anyhow::ensure!(
        resp.status == 200,
        "GET /metrics on {addr}: status {}",
        resp.status
    );
    Ok(Metrics::parse(&resp.body))
}

/// Scrapes and returns the value of `name` (error if absent, listing what is there).
pub async fn scrape_value(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let m = scrape(addr).await?;
    m.get(name)
        .with_context(|| format!("metric {name} absent on {addr}; present: {:?}", m.names()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_values() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE a gauge\na 3\nb{reason=\"timeout\",x=\"q\\\"z\"} 2\nb{reason=\"unknown\"} 5 1234\nc_total 1e3\n",
        );
        assert_eq!(m.get("a"), Some(3.0));
        assert_eq!(m.get_labeled("b", &[("reason", "timeout")]), Some(2.0));
        assert_eq!(m.get_labeled("b", &[("x", "q\"z")]), Some(2.0));
        assert_eq!(m.get("b"), Some(7.0));
        assert_eq!(m.get("c_total"), Some(1000.0));
        assert_eq!(m.get("missing"), None);
        assert_eq!(m.counter("b", &[("reason", "no_agent")]), 0.0);
    }
}
