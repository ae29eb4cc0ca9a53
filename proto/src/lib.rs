//! Meshwork's protobuf messages and gRPC services, generated at build time
//! from `proto/meshwork/v1/*.proto`. Nothing here is written by hand.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the Meshwork protocol.
pub mod v1 {
    tonic::include_proto!("meshwork.v1");
}
