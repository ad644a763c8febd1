//! Relative relocations packed as RELR, as the agent's binary does (see agent/build.rs): the
//! dynamic loader reads a few KiB of relocations at start instead of hundreds.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
