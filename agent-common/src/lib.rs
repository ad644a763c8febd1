//! Types shared between the kernel programs (agent-ebpf) and the agent.
#![no_std]
