//! Spoke's own HTTP/2 and gRPC framing for agent streams and frontends.
//!
//! Why not tonic/hyper/h2: on the data path they cost copies (the message encoded into
//! tonic's buffer, the plaintext copied from rustls into h2's buffer, h2's frames copied into
//! tonic's decode buffer), small TLS reads, and a task hop per message in each direction.
//! Here one task per connection reads large blocks, decrypts, splits frames off the buffer
//! without copying, decodes each packet (its payload a slice of that buffer) and hands it to
//! its stream's endpoint inline; outgoing packets are framed with their payload `Bytes`
//! chained, never re-encoded, and encrypted straight into the output buffer.
pub mod conn;
pub mod driver;
pub mod frame;
pub mod grpc;
pub mod headers;
pub mod hpack;
mod huffman;
pub mod io;
mod records;
mod trim;

#[cfg(test)]
mod tests;
