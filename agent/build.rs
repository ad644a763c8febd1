//! Embeds the eBPF object built by `cargo xtask build-ebpf`, when there is one.
//!
//! The kernel programs need a separate toolchain (see shared/ebpf-toolchain.md), so this script
//! does not build them: it copies the object into OUT_DIR, or writes an empty file so that a
//! plain `cargo build` on a machine without the toolchain still works and the agent reports
//! eBPF as unavailable. Set SPOKE_EBPF_OBJECT to embed an object from elsewhere.
use std::{
    env, fs,
    path::{Path, PathBuf},
};

fn main() {
    pack_relative_relocs();
    println!("cargo:rerun-if-env-changed=SPOKE_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("SPOKE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../agent-ebpf/target/bpfel-unknown-none/release/spoke-agent-ebpf")
        });
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("spoke-agent-ebpf.o");

    if object.is_file() {
        println!("cargo:rerun-if-changed={}", object.display());
        fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
    } else {
        // Watch the nearest existing ancestor so a later build-ebpf is picked up without
        // re-running this script on every build, but only inside agent-ebpf/: cargo scans a
        // watched directory recursively (following symlinks), and for an object path outside
        // (SPOKE_EBPF_OBJECT=/nonexistent/...) the nearest ancestor can be `/`, which means
        // the whole filesystem, /proc and /sys included: every later build hangs. Elsewhere
        // only a change of SPOKE_EBPF_OBJECT (or of this script) reruns it.
        let ebpf_crate = manifest.join("../agent-ebpf");
        let watch = object
            .ancestors()
            .skip(1)
            .find(|p| p.starts_with(&ebpf_crate) && p.exists())
            .unwrap_or(Path::new("build.rs"));
        println!("cargo:rerun-if-changed={}", watch.display());
        println!(
            "cargo:warning=eBPF object {} not found: building spoke-agent without eBPF \
             (run `cargo xtask setup && cargo xtask build-ebpf` to include it)",
            object.display()
        );
        fs::write(&out, []).expect("write the empty eBPF placeholder");
    }
}

/// Relative relocations packed as RELR (binutils 2.38; Debian 12 has 2.40): the dynamic loader
/// reads about 6 KiB of relocations at start instead of 470 KiB, and those pages no longer stay
/// mapped, so an idle agent's RSS is about 0.5 MiB lower. The binary then needs glibc 2.36 or
/// later (Debian 12, the distroless cc-debian12 image); SPOKE_PACK_RELOCS=0 builds one for an
/// older glibc. The server does the same.
fn pack_relative_relocs() {
    println!("cargo:rerun-if-env-changed=SPOKE_PACK_RELOCS");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
        && env::var("SPOKE_PACK_RELOCS").as_deref() != Ok("0")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
