//! Generates the wire types without a system `protoc`: protox parses the .proto files.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/konnectivity-client/proto/client/client.proto",
        "proto/agent/agent.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // The rpc is named Connect: a transport `connect()` constructor would clash with it.
        .build_transport(false)
        // Payloads stay `Bytes` end to end: decoding slices the receive buffer, no copy.
        .bytes(".Data.data")
        // Small initial buffers per call (see src/codec.rs): an agent stream is open for good.
        .codec_path("crate::codec::SpokeCodec")
        .compile_fds(fds)?;
    Ok(())
}
