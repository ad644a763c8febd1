//! The gRPC codec of every Spoke stream: prost's, with small initial buffers. tonic's default
//! allocates 8 KiB to decode and 8 KiB to encode on every call up front; an agent stream
//! stays open for the agent's lifetime and is idle most of it, so a server with thousands
//! of agents paid 16 KiB each for nothing. Buffers still grow on demand (and the encoder
//! still batches up to 32 KiB of ready messages per write).
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial size of the encode and decode buffers of one call.
pub const INITIAL_BUFFER: usize = 512;
/// Ready messages batched into one write (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 << 10;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// [`ProstCodec`] with [`INITIAL_BUFFER`]-sized buffers (named by the generated code).
#[derive(Debug, Clone, Copy)]
pub struct SpokeCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SpokeCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SpokeCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
