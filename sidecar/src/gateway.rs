//! Gateway mode: the sidecar as an ingress gateway, the mesh's door for
//! outside clients. Its listeners come from the `ingress-gateway` config
//! entry named after it (`meshwork_core::ingress`), applied live by the
//! follower of the registry's proxy settings (`policy::defaults`): each
//! listener with one service becomes an outbound listener of the proxy on
//! the gateway's bind address, so calls through it get everything an
//! upstream has — the service's discovery chain, mutual TLS to its
//! sidecars, retries, timeouts, outlier ejection, metrics and access log.
//!
//! A listener with TLS enabled (its own `TLS.Enabled`, else the entry's)
//! terminates TLS with the gateway's `[[gateway.certificates]]`
//! (`crate::tls::edge`: SNI picks the certificate).
//!
//! Not built yet, and refused (reported to the registry, the other
//! listeners applied): routing by `Host` among several services on one
//! listener.

use serde_json::{Map, Value};

use crate::config::{Config, Gateway, Upstream};

/// The config-entry kind a gateway follows.
pub const KIND: &str = "ingress-gateway";

/// What a gateway's entry makes of it: its listeners as outbound
/// listeners, and what it could not apply (one line per listener).
#[derive(Debug, Default)]
pub struct Listeners {
    pub upstreams: Vec<Upstream>,
    pub refused: Vec<String>,
}

/// The listeners `entry` (the gateway's `ingress-gateway` body, `None`
/// when there is none: no listeners) gives `gateway`. A malformed entry
/// is an error (the registry refuses those at `PUT`).
pub fn listeners(
    gateway: &Gateway,
    entry: Option<&Map<String, Value>>,
) -> Result<Listeners, String> {
    let Some(entry) = entry else {
        return Ok(Listeners::default());
    };
    let mut out = Listeners::default();
    for l in meshwork_core::ingress::parse(&gateway.name, entry)? {
        let at = format!(
            "ingress-gateway {:?} listener on port {}",
            gateway.name, l.port
        );
        if l.tls && gateway.tls.is_none() {
            out.refused.push(format!(
                "{at}: TLS is enabled but the gateway has no [[gateway.certificates]]; the listener is not opened"
            ));
            continue;
        }
        let [service] = l.services.as_slice() else {
            out.refused.push(format!(
                "{at}: routing by Host among several services on one listener is not built yet; the listener is not opened"
            ));
            continue;
        };
        if !service.hosts.is_empty() {
            out.refused.push(format!(
                "{at}: Hosts on a listener are not matched yet (requests for other hosts would reach {:?}); the listener is not opened",
                service.name
            ));
            continue;
        }
        let listen = std::net::SocketAddr::new(gateway.bind, l.port);
        let mut upstream = crate::config::gateway_upstream(&service.name, listen, &l.protocol)?;
        upstream.edge_tls = l.tls;
        out.upstreams.push(upstream);
    }
    Ok(out)
}

/// `config` with its gateway's listeners from `entry` (a sidecar's config
/// is returned as it is).
pub fn with_listeners(
    config: &Config,
    entry: Option<&Map<String, Value>>,
) -> Result<(Config, Vec<String>), String> {
    let Some(gateway) = &config.gateway else {
        return Ok((config.clone(), Vec::new()));
    };
    let made = listeners(gateway, entry)?;
    let mut out = config.clone();
    out.upstreams = made.upstreams;
    Ok((out, made.refused))
}
