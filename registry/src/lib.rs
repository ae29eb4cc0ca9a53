//! The Meshwork registry server: a Raft-replicated catalog, key/value
//! store and configuration store with Consul-compatible APIs.
//!
//! Rooms, and the one way their dependencies point:
//! `server` (listeners, tasks) → `api` (REST, gRPC), `dns` → `auth` (ACL
//! resolution, every permission decision) and `cluster`
//! (leader routing, forwarding) and `leader` (duties only the leader runs)
//! → `raft` (openraft's seams) → `storage` (WAL, snapshot file, data dir)
//! and `state` (pure: no I/O, no clocks) with `command`, the log's
//! contract. `watch` fans changes out; `metrics` is a leaf everyone
//! records into; `telemetry` keeps what sidecars report (in memory).

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cluster;
pub mod command;
pub mod config;
pub mod connect;
pub mod dns;
pub mod leader;
pub mod metrics;
pub mod raft;
pub mod server;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod watch;
