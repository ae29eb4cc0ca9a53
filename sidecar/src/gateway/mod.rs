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
//! An HTTP listener with several services, or with `Hosts`, routes each
//! request by its `Host` (HTTP/2: `:authority`): an exact host, a
//! `*.example.com` suffix, or Consul's default `<service>.ingress.*` for a
//! service without hosts; a host no service has gets 404
//! `x-meshwork-error: no-route`.

pub mod edge;
pub mod jwt;
pub mod keys;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{Config, Gateway, Upstream};

/// The `jwt-provider` entries by name, as last seen.
pub type ProviderEntries<'a> = &'a dyn Fn(&str) -> Option<&'a Map<String, Value>>;

/// What a gateway's listeners are made from besides its own entry: the
/// `jwt-provider` entries by name, and the headers every one of them sets
/// (each listener strips them all).
#[derive(Clone, Copy)]
pub struct Providers<'a> {
    pub by_name: ProviderEntries<'a>,
    pub owned_headers: &'a [String],
}

impl Providers<'_> {
    /// None at all.
    pub fn none() -> Providers<'static> {
        Providers {
            by_name: &|_| None,
            owned_headers: &[],
        }
    }
}

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
    providers: Providers<'_>,
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
        // The providers the listener names, each as its entry says; a
        // missing or unreadable one keeps the listener closed (it would
        // otherwise refuse every token, or worse, pass them).
        let mut named = Vec::new();
        let mut missing = None;
        for required in &l.edge.jwt {
            match (providers.by_name)(&required.provider)
                .map(|body| meshwork_core::jwt_provider::parse(&required.provider, body))
            {
                Some(Ok(p)) => named.push(p),
                Some(Err(e)) => missing = Some(e),
                None => missing = Some(format!("no jwt-provider entry {:?}", required.provider)),
            }
        }
        if let Some(why) = missing {
            out.refused
                .push(format!("{at}: {why}; the listener is not opened"));
            continue;
        }
        if l.edge.api_key_header.is_some() && gateway.api_keys.is_empty() {
            out.refused.push(format!(
                "{at}: APIKeys is set but the gateway has no [[gateway.api_keys]]; the listener is not opened"
            ));
            continue;
        }
        let listen = std::net::SocketAddr::new(gateway.bind, l.port);
        if l.edge.https_redirect.is_some() {
            // Forwards nothing: its cluster is the gateway's own service,
            // never called.
            let mut upstream = crate::config::gateway_upstream(&gateway.name, listen, "http")?;
            upstream.edge = Some(Arc::new(crate::config::edge::EdgeSpec {
                policy: l.edge.clone(),
                providers: Vec::new(),
                owned_headers: providers.owned_headers.to_vec(),
                api_keys: Arc::clone(&gateway.api_keys),
                trusted_hops: gateway.trusted_hops,
                trusted_proxies: Arc::clone(&gateway.trusted_proxies),
                https: false,
                port: l.port,
            }));
            out.upstreams.push(upstream);
            continue;
        }
        let routes_by_host = l.services.len() > 1 || l.services.iter().any(|s| !s.hosts.is_empty());
        let mut upstream = if routes_by_host {
            // Several services, or hosts: each request by its Host; the
            // listener's own settings are the first service's.
            let mut routes = Vec::new();
            for service in &l.services {
                let hosts = if service.hosts.is_empty() {
                    // Consul's default: <name>.ingress.<any domain>.
                    vec![format!("{}.ingress.*", service.name.to_ascii_lowercase())]
                } else {
                    service.hosts.clone()
                };
                routes.push(crate::config::HostRoute {
                    hosts,
                    upstream: crate::config::gateway_upstream(&service.name, listen, &l.protocol)?,
                });
            }
            let mut first = routes[0].upstream.clone();
            first.host_routes = routes;
            first
        } else {
            crate::config::gateway_upstream(&l.services[0].name, listen, &l.protocol)?
        };
        upstream.edge_tls = l.tls;
        if upstream.protocol.is_http() {
            upstream.edge = Some(Arc::new(crate::config::edge::EdgeSpec {
                policy: l.edge.clone(),
                providers: named,
                owned_headers: providers.owned_headers.to_vec(),
                api_keys: Arc::clone(&gateway.api_keys),
                trusted_hops: gateway.trusted_hops,
                trusted_proxies: Arc::clone(&gateway.trusted_proxies),
                https: l.tls,
                port: l.port,
            }));
        }
        out.upstreams.push(upstream);
    }
    Ok(out)
}

/// `config` with its gateway's listeners from `entry` (a sidecar's config
/// is returned as it is).
pub fn with_listeners(
    config: &Config,
    entry: Option<&Map<String, Value>>,
    providers: Providers<'_>,
) -> Result<(Config, Vec<String>), String> {
    let Some(gateway) = &config.gateway else {
        return Ok((config.clone(), Vec::new()));
    };
    let made = listeners(gateway, entry, providers)?;
    let mut out = config.clone();
    out.upstreams = made.upstreams;
    Ok((out, made.refused))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gateway() -> Gateway {
        Gateway {
            name: "edge".into(),
            bind: std::net::IpAddr::from([127, 0, 0, 1]),
            tls: None,
            certificates: Vec::new(),
            trusted_hops: 0,
            trusted_proxies: Arc::default(),
            api_keys: Arc::default(),
        }
    }

    #[test]
    fn hosts_route_to_the_most_specific_match_as_envoy_ranks_them() {
        let entry = json!({"Listeners": [{"Port": 8080, "Protocol": "http", "Services": [
            {"Name": "wild", "Hosts": ["*.example.com"]},
            {"Name": "deep", "Hosts": ["*.api.example.com"]},
            {"Name": "exact", "Hosts": ["api.example.com"]},
            {"Name": "web"}]}]});
        let made = listeners(&gateway(), entry.as_object(), Providers::none()).expect("valid");
        assert!(made.refused.is_empty(), "{:?}", made.refused);
        let routes = &made.upstreams[0].host_routes;
        let pick = |host: &str| {
            routes
                .iter()
                .filter_map(|r| r.rank(host).map(|rank| (rank, r.upstream.name.as_str())))
                .fold(
                    None,
                    |best: Option<((u8, usize), &str)>, (rank, name)| match best {
                        Some((b, _)) if b >= rank => best,
                        _ => Some((rank, name)),
                    },
                )
                .map(|(_, name)| name)
        };
        assert_eq!(
            pick("api.example.com"),
            Some("exact"),
            "exact beats wildcards"
        );
        assert_eq!(
            pick("v1.api.example.com"),
            Some("deep"),
            "the longest suffix"
        );
        assert_eq!(pick("shop.example.com"), Some("wild"));
        assert_eq!(
            pick("example.com"),
            None,
            "a wildcard needs a label before it"
        );
        assert_eq!(pick("evil-example.com"), None);
        assert_eq!(
            pick("web.ingress.example.org"),
            Some("web"),
            "Consul's default host"
        );
        assert_eq!(pick("web.ingress"), None);
    }

    #[test]
    fn a_tls_listener_without_certificates_is_reported_and_the_rest_applied() {
        let entry = json!({"Listeners": [
            {"Port": 8443, "Protocol": "http", "TLS": {"Enabled": true}, "Services": [{"Name": "api"}]},
            {"Port": 8080, "Protocol": "http", "Services": [{"Name": "api"}]}]});
        let made = listeners(&gateway(), entry.as_object(), Providers::none()).expect("valid");
        assert_eq!(made.upstreams.len(), 1);
        assert_eq!(made.upstreams[0].listen.port(), 8080);
        assert!(made.refused[0].contains("port 8443"), "{:?}", made.refused);
    }
}
