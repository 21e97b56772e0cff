//! Integration tests: the real server on 127.0.0.1:0 over gRPC, and the real
//! binary for crash tests. One binary, a module per area.

mod admin;
mod auth;
mod cli;
mod crash;
mod delivery;
mod durability;
mod faults;
mod harness;
mod health;
mod hostile;
mod http2;
mod inbox;
mod instances;
mod maintenance;
mod metrics;
mod ordering;
mod outbox;
mod overload;
mod partition;
mod peek;
mod proxy;
mod publish;
mod relay;
mod storage;
mod tls;
mod trace;
