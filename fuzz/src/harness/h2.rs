//! The gRPC frontend's header-block filter (`spoke_tunnel::h2_authority`), fed a client's
//! bytes as the socket would hand them over: in reads of varying sizes.
use super::{Checks, Input};
use spoke_tunnel::h2_authority::{AuthorityFilter, FilterMetrics};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A socket that hands out its bytes in reads of the given sizes (cycled).
struct Reads<'a> {
    data: &'a [u8],
    sizes: &'a [usize],
    turn: usize,
}

impl AsyncRead for Reads<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let size = me.sizes[me.turn % me.sizes.len()];
        me.turn += 1;
        let n = size.min(buf.remaining()).min(me.data.len());
        buf.put_slice(&me.data[..n]);
        me.data = &me.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// What `h2` would read through the filter: the bytes, or the fact of an error.
fn filtered(stream: &[u8], sizes: &[usize]) -> Option<Vec<u8>> {
    let reads = Reads {
        data: stream,
        sizes,
        turn: 0,
    };
    let mut filter = AuthorityFilter::new(reads, FilterMetrics::default());
    let mut out = Vec::new();
    // The reader never returns Pending, so polling to completion needs no runtime.
    futures::executor::block_on(filter.read_to_end(&mut out))
        .ok()
        .map(|_| out)
}

/// Input: a byte choosing the read sizes, a byte choosing whether the HTTP/2 preface comes
/// first (it usually should: without it the filter only passes bytes through), the stream.
pub fn h2_authority_with(data: &[u8], _checks: Checks) {
    let mut input = Input::new(data);
    let split = usize::from(input.u8()).max(1);
    let preface = input.u8() & 1 == 0;
    let mut stream = if preface {
        PREFACE.to_vec()
    } else {
        Vec::new()
    };
    stream.extend_from_slice(input.bytes(usize::MAX));

    let whole = filtered(&stream, &[1 << 20]);
    // How the client's bytes fall into reads must not change what h2 sees, nor whether the
    // connection is refused.
    for sizes in [&[1][..], &[split, 1, 9], &[split * 37 + 5]] {
        assert_eq!(
            filtered(&stream, sizes),
            whole,
            "read sizes {sizes:?} changed the filter's output"
        );
    }
    // Without the preface nothing is parsed: the bytes pass unchanged.
    if !stream.starts_with(PREFACE) && !PREFACE.starts_with(&stream) {
        assert_eq!(whole.as_deref(), Some(&stream[..]));
    }
}
