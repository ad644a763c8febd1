//! Agent identifiers (`agentidentifiers` metadata, `--agent-identifiers` flag): a URL
//! query string such as `host=node1&ipv4=10.0.0.5&default-route=true`.
use std::fmt;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentIdentifiers {
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
    pub host: Vec<String>,
    pub cidr: Vec<String>,
    pub default_route: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub struct UnknownKey(pub String);

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown agent identifier {:?} (known: ipv4, ipv6, host, cidr, default-route)",
            self.0
        )
    }
}

/// Whether Go's `strconv.ParseBool` reads `v` as true (upstream parses `default-route` with
/// it; anything it cannot parse counts as false).
fn go_parse_bool_true(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

impl AgentIdentifiers {
    /// The agent rejects unknown keys (`strict`); the server ignores them for version skew.
    pub fn parse(query: &str, strict: bool) -> Result<Self, UnknownKey> {
        let mut ids = AgentIdentifiers::default();
        let mut route_seen = false;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "ipv4" => ids.ipv4.push(v.into_owned()),
                "ipv6" => ids.ipv6.push(v.into_owned()),
                "host" => ids.host.push(v.into_owned()),
                "cidr" => ids.cidr.push(v.into_owned()),
                // Upstream reads the first value only.
                "default-route" if !route_seen => {
                    ids.default_route = go_parse_bool_true(&v);
                    route_seen = true;
                }
                "default-route" => {}
                other if strict => return Err(UnknownKey(other.to_string())),
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Every address or name this agent answers for (destHost strategy).
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.ipv4
            .iter()
            .chain(&self.ipv6)
            .chain(&self.host)
            .map(String::as_str)
    }
}

/// The host part of a dial address `host:port`, IPv6 brackets removed.
pub fn dial_host(address: &str) -> &str {
    let host = match address.rfind(':') {
        Some(i) if address.starts_with('[') || address[..i].find(':').is_none() => &address[..i],
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_example() {
        let ids = AgentIdentifiers::parse(
            "host=node1&host=node1.example.com&ipv4=10.0.0.5&ipv6=fd00::5&cidr=10.0.0.0/16&default-route=true",
            true,
        )
        .unwrap();
        assert_eq!(ids.host, vec!["node1", "node1.example.com"]);
        assert_eq!(ids.ipv6, vec!["fd00::5"]);
        assert!(ids.default_route);
        assert_eq!(ids.hosts().count(), 4);
    }

    #[test]
    fn unknown_keys_strict_vs_lenient() {
        assert_eq!(
            AgentIdentifiers::parse("zone=a", true),
            Err(UnknownKey("zone".into()))
        );
        assert_eq!(
            AgentIdentifiers::parse("zone=a&host=x", false)
                .unwrap()
                .host,
            vec!["x"]
        );
        assert_eq!(
            AgentIdentifiers::parse("", true).unwrap(),
            AgentIdentifiers::default()
        );
    }

    #[test]
    fn dial_hosts() {
        assert_eq!(dial_host("10.0.0.1:10250"), "10.0.0.1");
        assert_eq!(dial_host("[fd00::5]:443"), "fd00::5");
        assert_eq!(dial_host("node1:80"), "node1");
        assert_eq!(dial_host("fd00::5"), "fd00::5");
    }
}
