//! tidings: reliable notifications between services. A durable gRPC broker
//! (`tidings serve`); on the producer side the outbox and its relay
//! (`tidings relay`); on the consumer side the inbox and the consumer
//! runtime; the Rust client. The `tidings` binary (with its bench) parses
//! flags and calls this library.
//!
//! See `ARCHITECTURE.md` for the map of the code.

// The client, the domain and the wire conversions build without any
// database; the broker, the outbox, the inbox and the consumer runtime need
// at least one of the `sqlite` and `postgres` features, and support the
// databases whose features are on.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod broker;
pub mod client;
pub mod config;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod consumer;
pub mod error;
#[cfg(all(feature = "fuzzing", any(feature = "sqlite", feature = "postgres")))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod inbox;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod metrics;
pub mod model;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod outbox;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod server;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod session;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod store;
pub mod trace;
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
