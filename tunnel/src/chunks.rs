//! A queue of byte chunks that goes out in gathered (vectored) writes, a few bytes of one
//! chunk at a time if the socket takes only that: the relay's plain writer and HTTP/2's
//! output (plain, or TLS taking plaintext off the front as it seals) share these two steps.
use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Fills `slices` with the front of `queue`; how many it filled.
pub fn front_slices<'a>(queue: &'a VecDeque<Bytes>, slices: &mut [IoSlice<'a>]) -> usize {
    let mut k = 0;
    for (slot, c) in slices.iter_mut().zip(queue) {
        *slot = IoSlice::new(c);
        k += 1;
    }
    k
}

/// Takes `n` bytes off the front of `queue` (whole chunks, then the start of one), and any
/// empty chunks then at the front, so that a queue that is not empty has a byte to write first.
pub fn advance(queue: &mut VecDeque<Bytes>, mut n: usize) {
    while let Some(front) = queue.front_mut() {
        if front.len() > n {
            front.advance(n);
            return;
        }
        n -= front.len();
        queue.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks of `len` bytes, each byte its chunk's length.
    fn queue(lens: &[usize]) -> VecDeque<Bytes> {
        lens.iter()
            .map(|&n| Bytes::from(vec![n as u8; n]))
            .collect()
    }

    #[test]
    fn advance_takes_whole_chunks_then_part_of_one() {
        let mut q = queue(&[3, 0, 4, 5]);
        advance(&mut q, 5);
        assert_eq!(q, [Bytes::from(vec![4; 2]), Bytes::from(vec![5; 5])]);
        advance(&mut q, 2);
        assert_eq!(q, [Bytes::from(vec![5; 5])]);
    }

    #[test]
    fn advance_leaves_no_empty_chunk_in_front() {
        let mut q = queue(&[3, 0, 0, 2, 0]);
        advance(&mut q, 3);
        assert_eq!(q, [Bytes::from(vec![2; 2]), Bytes::new()]);
        advance(&mut q, 2);
        assert!(q.is_empty());
        let mut q = queue(&[0, 0, 1]);
        advance(&mut q, 0);
        assert_eq!(q, [Bytes::from(vec![1; 1])]);
    }

    #[test]
    fn front_slices_fill_what_fits() {
        let q = queue(&[1, 2, 3]);
        let mut slices = [IoSlice::new(&[]); 2];
        assert_eq!(front_slices(&q, &mut slices), 2);
        assert_eq!((slices[0].len(), slices[1].len()), (1, 2));
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(front_slices(&q, &mut slices), 3);
    }
}
