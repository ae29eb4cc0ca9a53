//! The Meshwork registry server: a Raft-replicated catalog, key/value
//! store and configuration store with Consul-compatible APIs.
//!
//! Dependencies point one way: `api → node → raft → state`. Nothing in
//! `state` knows about HTTP, gRPC or sled.

#![forbid(unsafe_code)]

pub mod api;
pub mod autopilot;
pub mod command;
pub mod config;
pub mod datadir;
pub mod dns;
pub mod gc;
pub mod health;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod server;
pub mod session;
pub mod state;
pub mod watch;
