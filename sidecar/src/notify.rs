//! systemd's readiness protocol, shared with the registry
//! ([`meshwork_registry::notify`]).

pub use meshwork_registry::notify::stopping;

/// Tells systemd the sidecar is up: its service is registered.
pub fn ready() {
    meshwork_registry::notify::ready("registered with the registry");
}
