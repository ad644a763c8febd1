//! The `/metrics` exposition: Prometheus text format as upstream's Go binaries write it.
use prometheus_client::registry::Registry;

/// Renders a registry in the Prometheus text format (0.0.4), as upstream's Go binaries
/// expose it, so dashboards and tools built for upstream see the same HELP and TYPE lines.
///
/// prometheus-client writes OpenMetrics; the differences are fixed here in one place:
/// HELP texts lose the period it appends, counters are declared under their `_total`
/// sample name, `# UNIT`/`# EOF` go away, and counters registered with a name ending in
/// `_count` (upstream's `dial_failure_count` and friends) keep that exact name.
pub fn encode(reg: &Registry) -> String {
    let mut open = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut open, reg);
    to_prometheus_text(&open)
}

fn to_prometheus_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut block: Vec<&str> = Vec::new();
    for line in open.lines() {
        if line.starts_with("# HELP ") && !block.is_empty() {
            flush_block(&block, &mut out);
            block.clear();
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        block.push(line);
    }
    flush_block(&block, &mut out);
    out
}

fn flush_block(block: &[&str], out: &mut String) {
    let Some(name) = block
        .first()
        .and_then(|l| l.strip_prefix("# HELP "))
        .and_then(|l| l.split(' ').next())
    else {
        for l in block {
            out.push_str(l);
            out.push('\n');
        }
        return;
    };
    let is_counter = block.iter().any(|l| *l == format!("# TYPE {name} counter"));
    let keep_exact = is_counter && name.ends_with("_count");
    let declared = if is_counter && !keep_exact {
        format!("{name}_total")
    } else {
        name.to_string()
    };
    let total = format!("{name}_total");
    for l in block {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let help = rest[name.len()..].trim_start();
            out.push_str(&format!(
                "# HELP {declared} {}\n",
                help.strip_suffix('.').unwrap_or(help)
            ));
        } else if l.starts_with("# TYPE ") {
            let kind = l.rsplit(' ').next().unwrap_or("untyped");
            out.push_str(&format!("# TYPE {declared} {kind}\n"));
        } else if keep_exact && l.starts_with(&total) {
            out.push_str(name);
            out.push_str(&l[total.len()..]);
            out.push('\n');
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use spoke_tunnel::metrics::ReasonLabels;

    #[test]
    fn upstream_names_and_help() {
        let mut reg = Registry::default();
        let sub = reg.sub_registry_with_prefix("konnectivity_network_proxy_agent");
        let failures: Family<ReasonLabels, Counter> = Family::default();
        failures
            .get_or_create(&ReasonLabels { reason: "timeout" })
            .inc();
        sub.register(
            "endpoint_dial_failure",
            "Number of failures dialing the remote endpoint, by reason (example: timeout).",
            failures,
        );
        let exact: Family<ReasonLabels, Counter> = Family::default();
        exact
            .get_or_create(&ReasonLabels { reason: "no_agent" })
            .inc_by(2);
        sub.register(
            "dial_failure_count",
            "Number of dial failures observed",
            exact,
        );
        let open: Gauge = Gauge::default();
        sub.register(
            "open_endpoint_connections",
            "Current number of open endpoint connections.",
            open,
        );
        let h = Histogram::new([0.5, 1.0]);
        h.observe(0.7);
        sub.register(
            "dial_duration_seconds",
            "Latency of dial to the remote endpoint in seconds",
            h,
        );
        let text = encode(&reg);
        let want = [
            "# HELP konnectivity_network_proxy_agent_endpoint_dial_failure_total Number of failures dialing the remote endpoint, by reason (example: timeout).",
            "# TYPE konnectivity_network_proxy_agent_endpoint_dial_failure_total counter",
            "konnectivity_network_proxy_agent_endpoint_dial_failure_total{reason=\"timeout\"} 1",
            "# HELP konnectivity_network_proxy_agent_dial_failure_count Number of dial failures observed",
            "# TYPE konnectivity_network_proxy_agent_dial_failure_count counter",
            "konnectivity_network_proxy_agent_dial_failure_count{reason=\"no_agent\"} 2",
            "# HELP konnectivity_network_proxy_agent_open_endpoint_connections Current number of open endpoint connections.",
            "konnectivity_network_proxy_agent_open_endpoint_connections 0",
            "# TYPE konnectivity_network_proxy_agent_dial_duration_seconds histogram",
            "konnectivity_network_proxy_agent_dial_duration_seconds_count 1",
        ];
        for w in want {
            assert!(text.lines().any(|l| l == w), "missing {w:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("_count_total"));
    }
}
