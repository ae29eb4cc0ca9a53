//! systemd's readiness protocol, shared with the registry
//! ([`meshwork_core::notify`]).

pub use meshwork_core::notify::stopping;

/// Tells systemd the sidecar is up: its service is registered.
pub fn ready() {
    meshwork_core::notify::ready("registered with the registry");
}
