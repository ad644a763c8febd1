//! Placeholder: the eBPF programs land with the eBPF data-plane work.
#![no_std]
#![no_main]
