#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| spoke_fuzz::harness::hpack(data));
