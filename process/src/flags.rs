//! Parsers for flag values as Go's pflag renders them, so upstream command lines (and
//! upstream's own test harness, which passes every flag as `--name=value`) work unchanged.
use std::time::Duration;

/// Go `time.ParseDuration`: `1h0m0s`, `100ms`, `1.5s`, `0`.
pub fn go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" || s == "+0" {
        return Ok(Duration::ZERO);
    }
    let body = s.strip_prefix('+').unwrap_or(s);
    if body.is_empty() || body.starts_with('-') {
        return Err(format!(
            "invalid duration {s:?} (must be positive, e.g. 1s, 100ms, 1h0m0s)"
        ));
    }
    let mut total = 0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("invalid duration {s:?}: missing unit"))?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: bad number {num:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
        };
        total += value * seconds;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("invalid duration {s:?}: out of range"))
}

/// Go pflag string slices: `a,b`, `[a,b]`, `[]` and the empty string.
pub fn string_list(s: &str) -> Vec<String> {
    let s = s.trim();
    let s = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// [`string_list`] as a clap `value_parser` (it never fails).
pub fn list(s: &str) -> Result<Vec<String>, String> {
    Ok(string_list(s))
}

/// Byte sizes: plain numbers or with a Ki/Mi/Gi suffix.
pub fn byte_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = [("Ki", 1usize << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid size {s:?} (e.g. 4194304, 4Mi, 512Ki)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_go_renders_them() {
        assert_eq!(go_duration("1h0m0s").unwrap(), Duration::from_secs(3600));
        assert_eq!(go_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(go_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(go_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(go_duration("0s").unwrap(), Duration::ZERO);
        assert!(go_duration("10").is_err());
        assert!(go_duration("-1s").is_err());
        assert!(go_duration("1x").is_err());
        assert!(go_duration("").is_err());
        assert!(go_duration("99999999999999999999h").is_err());
        assert!(go_duration("1e400s").is_err());
    }

    #[test]
    fn lists_as_pflag_renders_them() {
        assert!(string_list("[]").is_empty());
        assert!(string_list("").is_empty());
        assert_eq!(string_list("[h2,http/1.1]"), vec!["h2", "http/1.1"]);
        assert_eq!(string_list("a, b"), vec!["a", "b"]);
    }

    #[test]
    fn sizes() {
        assert_eq!(byte_size("4Mi").unwrap(), 4 << 20);
        assert_eq!(byte_size("1024").unwrap(), 1024);
        assert!(byte_size("0").is_err());
        assert!(byte_size("x").is_err());
    }
}
