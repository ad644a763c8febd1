//! Relative relocations packed as RELR, as the agent's binary does (see agent/build.rs): the
//! dynamic loader reads a few KiB of relocations at start instead of hundreds. Needs glibc 2.36
//! at run time; SPOKE_PACK_RELOCS=0 turns it off.
use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SPOKE_PACK_RELOCS");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
        && env::var("SPOKE_PACK_RELOCS").as_deref() != Ok("0")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
