//! Reaching the upstream: a cluster's endpoints and their health
//! ([`cluster`], [`endpoint`], [`outlier`]), picking one ([`balance`]),
//! opening connections ([`dial`]) and keeping them ([`pool`]), and the
//! client side of each protocol on them ([`h1`], the inline HTTP/1.1 leg;
//! [`h2c`], one shared HTTP/2 connection per endpoint). Nothing here knows
//! about listeners or how a request is routed or retried.

pub mod balance;
pub mod cluster;
pub mod dial;
pub mod endpoint;
pub mod h1;
pub mod h2c;
pub mod outlier;
pub mod pool;

use bytes::Bytes;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends (upstream's, buffered, or its own).
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Request headers larger than this get 431 (HTTP/1.1) or a stream
/// error (HTTP/2).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
