//! tidings: reliable notifications between services. A durable gRPC broker
//! (`tidings serve`); on the producer side the outbox and its relay
//! (`tidings relay`); on the consumer side the inbox and the consumer
//! runtime; the Rust client. The `tidings` binary (with its bench) parses
//! flags and calls this library.
//!
//! See `ARCHITECTURE.md` for the map of the code.

pub mod broker;
pub mod client;
pub mod config;
pub mod consumer;
pub mod error;
pub mod inbox;
pub mod model;
pub mod outbox;
pub mod server;
mod session;
pub mod store;
pub mod wire;

/// Generated protobuf and gRPC code for `tidings.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod proto {
    tonic::include_proto!("tidings.v1");

    /// The encoded descriptor set of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tidings_descriptor");

    /// A duration in its wire form.
    pub fn duration(d: std::time::Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos() as i32,
        }
    }
}

pub use error::{Error, Result};
