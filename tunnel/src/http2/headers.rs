//! A header list as HTTP/2 carries it: ordered (name, value) pairs, names in lower case.
use bytes::Bytes;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(Bytes, Bytes)>);

impl Headers {
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    pub fn from_fields(fields: Vec<(Bytes, Bytes)>) -> Headers {
        Headers(fields)
    }

    /// Adds a field; `name` must be lower case (HTTP/2 forbids upper-case names).
    pub fn push(&mut self, name: impl Into<Bytes>, value: impl Into<Bytes>) -> &mut Self {
        self.0.push((name.into(), value.into()));
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0.iter().map(|(n, v)| (&n[..], &v[..]))
    }

    /// Every value of `name`.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of `name`, if it is text.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
