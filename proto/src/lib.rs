//! Konnectivity wire types. Upstream's protos have no `package`, so everything lands in
//! the root module generated as `_.rs`.
#![allow(clippy::all, missing_docs)]

pub mod codec;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

pub use generated::*;
pub use generated::{
    agent_service_client, agent_service_server, proxy_service_client, proxy_service_server,
};
