//! Agent identifiers and Go-style flag values: strings from the command line and from
//! agent metadata.
use super::Checks;
use spoke_process::flags::{byte_size, go_duration, string_list};
use spoke_tunnel::identifiers::{dial_host, AgentIdentifiers};

/// Input: one byte of options, then the text (invalid UTF-8 is replaced, as metadata
/// values reach the parser only as valid strings).
pub fn identifiers_with(data: &[u8], _checks: Checks) {
    let Some((opts, text)) = data.split_first() else {
        return;
    };
    let s = String::from_utf8_lossy(text);
    let strict = opts & 1 == 1;

    let lenient = AgentIdentifiers::parse(&s, false).expect("lenient parse never fails");
    match AgentIdentifiers::parse(&s, strict) {
        Ok(ids) => assert_eq!(ids, lenient, "strict and lenient disagree on {s:?}"),
        Err(e) => {
            assert!(strict, "lenient parse failed on {s:?}");
            assert!(
                !["ipv4", "ipv6", "host", "cidr", "default-route"].contains(&e.0.as_str()),
                "known key {:?} rejected",
                e.0
            );
            let _ = e.to_string();
        }
    }
    assert_eq!(
        lenient.hosts().count(),
        lenient.ipv4.len() + lenient.ipv6.len() + lenient.host.len()
    );
    // Each key=value pair yields at most one value.
    let pairs = s.split('&').filter(|p| !p.is_empty()).count();
    assert!(
        lenient.ipv4.len() + lenient.ipv6.len() + lenient.host.len() + lenient.cidr.len() <= pairs
    );

    let host = dial_host(&s);
    assert!(
        s.contains(host),
        "dial_host({s:?}) = {host:?} is not part of it"
    );
    assert!(host.len() <= s.len());
    if !s.contains(':') {
        assert_eq!(host, s.trim_start_matches('[').trim_end_matches(']'));
    }
    // host:port with a plain host (no colon, no brackets) gives the host back.
    if let Some((h, _)) = s.split_once(':') {
        if !h.contains(['[', ']']) && !s[h.len() + 1..].contains(':') {
            assert_eq!(host, h, "dial_host({s:?})");
        }
    }
}

/// Input: one selector byte (which parser), then the flag value.
pub fn flags_with(data: &[u8], _checks: Checks) {
    let Some((which, text)) = data.split_first() else {
        return;
    };
    let s = String::from_utf8_lossy(text);
    match which % 3 {
        0 => duration(&s),
        1 => list(&s),
        _ => size(&s),
    }
}

fn duration(s: &str) {
    // Go's ParseDuration rejects values out of range; ours must fail too, never panic.
    if let Ok(d) = go_duration(s) {
        // Rendering it back (whole nanoseconds) parses to the same value, to within the
        // float rounding of the first parse (which may also tip a value at the very top of
        // the range over it).
        match go_duration(&format!("{}ns", d.as_nanos())) {
            Ok(again) => {
                let (a, b) = (d.as_nanos(), again.as_nanos());
                assert!(
                    a.abs_diff(b) <= 1 + a / (1 << 40),
                    "{s:?}: {d:?} vs {again:?}"
                );
            }
            Err(e) => assert!(
                d.as_secs() > u64::MAX / 2,
                "{s:?} → {d:?} does not re-parse: {e}"
            ),
        }
    }
}

fn list(s: &str) {
    let items = string_list(s);
    for i in &items {
        assert!(!i.is_empty(), "{s:?} gave an empty item");
        assert_eq!(i.trim(), i, "{s:?} gave an untrimmed item");
        assert!(!i.contains(','), "{s:?} gave an item with a comma");
    }
    // Rendering the list the way pflag does parses back to the same list, unless an item
    // itself looks like the brackets of a list.
    if !items.iter().any(|i| i.contains(['[', ']'])) {
        assert_eq!(string_list(&format!("[{}]", items.join(","))), items);
    }
}

fn size(s: &str) {
    if let Ok(n) = byte_size(s) {
        assert!(n > 0, "{s:?} gave size 0");
        assert_eq!(
            byte_size(&n.to_string()),
            Ok(n),
            "{s:?} → {n} does not re-parse"
        );
    }
}
