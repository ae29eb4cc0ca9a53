//! Meshwork's protobuf messages and gRPC services, generated at build time
//! from `proto/meshwork/v1/*.proto` (and the standard `grpc/health/v1`).
//! Nothing here is written by hand.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the Meshwork protocol.
pub mod v1 {
    tonic::include_proto!("meshwork.v1");
}

/// The standard gRPC health checking protocol (`grpc.health.v1`), which
/// sidecar `grpc` checks call.
pub mod grpc_health {
    tonic::include_proto!("grpc.health.v1");
}
