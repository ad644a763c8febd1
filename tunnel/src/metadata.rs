//! gRPC metadata of the `Connect` stream (`agentid`, `agentidentifiers`, `serverid`, ...):
//! read and written the same way by both ends.
use tonic::metadata::{MetadataMap, MetadataValue};

/// The value of `key`: `None` when absent, an error when it is given more than once or is
/// not ASCII (upstream rejects both).
pub fn one_value(md: &MetadataMap, key: &str) -> Result<Option<String>, String> {
    let mut values = md.get_all(key).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        let n = md.get_all(key).iter().count();
        return match n {
            0 => Ok(None),
            n => Err(format!("expected one {key} value, got {n}")),
        };
    };
    v.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| format!("{key} is not valid ASCII"))
}

/// Sets `key` to `value`.
pub fn insert(md: &mut MetadataMap, key: &'static str, value: &str) -> Result<(), String> {
    let v = MetadataValue::try_from(value).map_err(|_| format!("invalid {key} value"))?;
    md.insert(key, v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_one_many_and_binary() {
        let mut md = MetadataMap::new();
        assert_eq!(one_value(&md, "agentid"), Ok(None));
        insert(&mut md, "agentid", "a").unwrap();
        assert_eq!(one_value(&md, "agentid"), Ok(Some("a".into())));
        md.append("agentid", MetadataValue::from_static("b"));
        assert_eq!(
            one_value(&md, "agentid"),
            Err("expected one agentid value, got 2".into())
        );
        assert!(insert(&mut md, "serverid", "bad\nvalue").is_err());
    }
}
