//! TLS in the sidecar, all rustls configs built here and nowhere else:
//!
//! - [`registry`]: TLS to the registry's gRPC TLS port, from operator
//!   files (`[registry] tls`);
//! - the mesh's mutual TLS between sidecars: [`spiffe`] (identities in
//!   certificates), [`trust`] (the CA roots and the verifiers that check a
//!   peer's chain and SPIFFE ID), [`leaf`] (this sidecar's key, its CSR
//!   and when to renew), [`mesh`] (the shared state the listeners and
//!   dialers read: the current leaf, roots and rustls configs, swapped
//!   whole on every change; the task that keeps them current) and
//!   [`stream`] (a socket that is plain or TLS, without boxing per read);
//!   [`renew`] is the task that keeps the leaf and roots current;
//!   [`expiry`] says when a kept-alive connection's certificate no longer
//!   carries new requests (pooled ones made with a renewed leaf, accepted
//!   ones whose peer's leaf expired).
//!
//! Nothing here touches listeners, pools or HTTP: they ask [`mesh`] for a
//! config when they accept or dial.

pub mod edge;
pub mod expiry;
pub mod leaf;
pub mod mesh;
pub mod registry;
pub mod renew;
pub mod spiffe;
pub mod stream;
pub mod trust;

use std::sync::Arc;

pub use mesh::MeshTls;
pub use registry::{RegistryTls, RegistryTlsSettings};

/// rustls's ring provider: no C/CMake build (aws-lc), as the registry.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    // Deprecated for lacking post-quantum key exchange, which the ring
    // provider does not have; the registry uses it for the same reason.
    #[allow(deprecated)]
    let make = || Arc::new(rustls::crypto::ring::default_provider());
    Arc::clone(PROVIDER.get_or_init(make))
}
