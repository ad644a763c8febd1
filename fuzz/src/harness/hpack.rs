//! Spoke's HPACK decoder (`spoke_tunnel::http2::hpack`) against loona-hpack's, block after
//! block on one connection's table: the same fields, or both refusing the block.
use super::{Checks, Input};
use loona_hpack::decoder::DecoderError;
use spoke_tunnel::http2::hpack::{Decoder, HpackError};

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Input: one byte for the table size we announce (× 64), then blocks, each a little-endian
/// u16 length and that many bytes.
pub fn hpack_with(data: &[u8], _checks: Checks) {
    let mut input = Input::new(data);
    let limit = usize::from(input.u8()) * 64;
    let mut ours = Decoder::new(limit);
    let mut theirs = loona_hpack::Decoder::new();
    theirs.set_max_allowed_table_size(limit);
    while !input.is_empty() {
        let len = usize::from(input.u16());
        let block = input.bytes(len);
        let mut a: Fields = Vec::new();
        let got = ours.decode(block, |n, v| a.push((n.to_vec(), v.to_vec())));
        let mut b: Fields = Vec::new();
        let want = theirs.decode_with_cb(block, |n, v| b.push((n.to_vec(), v.to_vec())));
        match (got, want) {
            (Ok(()), Ok(())) => assert_eq!(a, b, "fields differ for block {block:02x?}"),
            // Either refusal ends the connection: nothing after it is decoded.
            (Err(_), Err(_)) => return,
            // Where RFC 7541 lets a decoder choose, we are the stricter one: integers are
            // capped at 2^28-ish (no table or string is near that) and a size update
            // must open the block (§4.2).
            (Err(HpackError::IntegerOverflow | HpackError::LateTableSizeUpdate), Ok(())) => {
                return
            }
            // loona alone refuses a block that ends in a size update; h2 and RFC 7541 accept.
            (Ok(()), Err(DecoderError::SizeUpdateAtEnd)) => return,
            (got, want) => panic!(
                "decoders disagree on block {block:02x?}: ours {got:?} ({a:?}), loona {want:?} ({b:?})"
            ),
        }
    }
}
