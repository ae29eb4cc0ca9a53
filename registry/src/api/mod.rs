//! The registry's public interfaces: REST (Consul-compatible) and gRPC.

pub mod grpc;
pub mod http;
