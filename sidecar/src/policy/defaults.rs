//! What the registry's config entries make of this sidecar's listeners:
//! a gateway's listeners from its `ingress-gateway` entry
//! ([`crate::gateway`]), then the defaults for the upstreams and the
//! inbound listener — its service's `service-defaults` `UpstreamConfig`
//! and `LocalConnectTimeoutMs` / `LocalRequestTimeoutMs` /
//! `MaxInboundConnections`, each upstream's own `service-defaults`
//! `Protocol` and the `proxy-defaults` entry `global`
//! (`meshwork_core::upstream_defaults`), applied under the config file
//! (what the file gives wins) through the proxy's reload: settings change
//! in place, a protocol change replaces the listener's route as a SIGHUP
//! reload would, a gateway's new listener opens. A reload of the file
//! applies them too ([`effective`]). The effective settings, and where
//! each came from, show in `/config`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use meshwork_core::chain::Entries;
use meshwork_proto::v1::ConfigEntry;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::applied::AppliedConfig;
use crate::config::Config;
use crate::discovery::{ConfigEntries, Discovery, TopicState};
use crate::listener::Proxy;

/// Every sidecar follows these; a gateway also [`GATEWAY_KINDS`].
const KINDS: [&str; 2] = ["service-defaults", "proxy-defaults"];
/// A gateway's listeners and the JWT providers they name.
const GATEWAY_KINDS: [&str; 2] = [crate::gateway::KIND, meshwork_core::jwt_provider::KIND];

type State = Arc<TopicState<BTreeMap<String, ConfigEntry>>>;

/// The kinds' entries as the core reads them.
struct Bodies(HashMap<(&'static str, String), Map<String, Value>>);

impl Entries for Bodies {
    fn entry(&self, kind: &str, name: &str) -> Option<&Map<String, Value>> {
        let kind = KINDS.iter().chain(&GATEWAY_KINDS).find(|k| **k == kind)?;
        self.0.get(&(*kind, name.to_owned()))
    }
}

fn bodies(states: &[(&'static str, State)]) -> Result<Bodies, String> {
    let mut out = HashMap::new();
    for (kind, state) in states {
        for (name, entry) in &state.value {
            out.insert((*kind, name.clone()), super::entry_body(entry)?);
        }
    }
    Ok(Bodies(out))
}

/// The kinds `config` follows.
fn kinds(config: &Config) -> Vec<&'static str> {
    let mut kinds = KINDS.to_vec();
    if config.gateway.is_some() {
        kinds.extend(GATEWAY_KINDS);
    }
    kinds
}

/// `config` with the registry's entries applied, from the entries as last
/// seen (until every kind's first snapshot came: the file alone). What a
/// gateway's entry asked that it cannot open is logged.
pub fn effective(config: &Config, discovery: &Discovery) -> Result<Config, String> {
    let states: Vec<_> = kinds(config)
        .into_iter()
        .map(|k| (k, Arc::clone(&discovery.config_entries(k).borrow())))
        .collect();
    if !states.iter().all(|(_, s)| s.ready) {
        return Ok(config.clone());
    }
    let (out, refused) = apply(config, &states)?;
    for why in refused {
        tracing::warn!(refused = %why, "gateway listener not opened");
    }
    Ok(out)
}

/// `config` with the entries applied, and what of them was refused while
/// the rest applies (a gateway's listeners it cannot open).
fn apply(
    config: &Config,
    states: &[(&'static str, State)],
) -> Result<(Config, Vec<String>), String> {
    let bodies = bodies(states)?;
    let entry = config
        .gateway
        .as_ref()
        .and_then(|g| bodies.entry(crate::gateway::KIND, &g.name));
    let by_name = |name: &str| bodies.entry(meshwork_core::jwt_provider::KIND, name);
    // Every provider's claim and payload headers (a listener strips them
    // all, not only its own providers').
    let mut owned_headers: Vec<String> = bodies
        .0
        .iter()
        .filter(|((kind, _), _)| *kind == meshwork_core::jwt_provider::KIND)
        .filter_map(|((_, name), body)| meshwork_core::jwt_provider::parse(name, body).ok())
        .flat_map(|p| {
            crate::gateway::edge::provider_headers(&p)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    owned_headers.sort();
    owned_headers.dedup();
    let providers = crate::gateway::Providers {
        by_name: &by_name,
        owned_headers: &owned_headers,
    };
    let (mut out, refused) = crate::gateway::with_listeners(config, entry, providers)?;
    let defaults_of = |upstream: &crate::config::Upstream| {
        meshwork_core::upstream_defaults::for_upstream(
            &config.service_name,
            &upstream.name,
            &bodies,
        )
        .map(|d| upstream.with_defaults(&d))
    };
    for upstream in &mut out.upstreams {
        let mut with = defaults_of(upstream)?;
        // A gateway listener's host routes: each service's own.
        for route in &mut with.host_routes {
            route.upstream = defaults_of(&route.upstream)?;
        }
        *upstream = with;
    }
    if let Some(inbound) = &mut out.inbound {
        let defaults =
            meshwork_core::upstream_defaults::for_inbound(&config.service_name, &bodies)?;
        *inbound = inbound.with_defaults(&defaults);
    }
    Ok((out, refused))
}

/// What the last reload applied: the upstreams, the inbound listener and
/// the file config it was made from (a file reload — new certificates, say
/// — is applied again even when the listeners come out the same: the file
/// reloader and this follower may have crossed).
type Applied = (
    Vec<crate::config::Upstream>,
    Option<crate::config::Inbound>,
    Arc<Config>,
);

/// Waits for a change of `entries` (never, without them).
async fn changed(entries: Option<&mut ConfigEntries>) -> bool {
    match entries {
        Some(e) => e.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Follows the kinds and the config file in use (`file`: the agent's
/// channel, which a reload updates) until `shutdown`, reloading the proxy
/// when the effective upstreams or inbound listener change.
pub async fn run(
    proxy: Arc<Proxy>,
    mut file: watch::Receiver<Arc<Config>>,
    discovery: Discovery,
    applied: AppliedConfig,
    shutdown: CancellationToken,
) {
    // Whether it is a gateway is fixed for the process (a reload cannot
    // change it).
    let followed = kinds(&file.borrow());
    let [mut defaults, mut global] = KINDS.map(|k| discovery.config_entries(k));
    let mut ingress = followed
        .contains(&crate::gateway::KIND)
        .then(|| discovery.config_entries(crate::gateway::KIND));
    let mut jwt_providers = followed
        .contains(&meshwork_core::jwt_provider::KIND)
        .then(|| discovery.config_entries(meshwork_core::jwt_provider::KIND));
    let consumer = applied.consumer("proxy defaults", &followed);
    let mut last: Option<Applied> = None;
    loop {
        let mut states = vec![
            (KINDS[0], Arc::clone(&defaults.borrow_and_update())),
            (KINDS[1], Arc::clone(&global.borrow_and_update())),
        ];
        if let Some(ingress) = &mut ingress {
            states.push((
                crate::gateway::KIND,
                Arc::clone(&ingress.borrow_and_update()),
            ));
        }
        if let Some(providers) = &mut jwt_providers {
            states.push((
                meshwork_core::jwt_provider::KIND,
                Arc::clone(&providers.borrow_and_update()),
            ));
        }
        let config = Arc::clone(&file.borrow_and_update());
        if states.iter().all(|(_, s)| s.ready) {
            let indexes: Vec<_> = states.iter().map(|(k, s)| (*k, s.index)).collect();
            match apply(&config, &states) {
                Ok((next, refused)) => {
                    let note = (!refused.is_empty()).then(|| refused.join("; "));
                    if let Some(note) = &note {
                        tracing::warn!(refused = %note, "gateway listeners not opened");
                    }
                    if last.as_ref().is_some_and(|(u, i, file)| {
                        *u == next.upstreams && *i == next.inbound && Arc::ptr_eq(file, &config)
                    }) {
                        consumer.applied(&indexes, note);
                    } else {
                        match proxy.reload(&next).await {
                            Ok(changes) => {
                                if !changes.is_empty() {
                                    tracing::info!(
                                        added = ?changes.added,
                                        removed = ?changes.removed,
                                        replaced = ?changes.replaced,
                                        reconfigured = ?changes.reconfigured,
                                        "config from the registry applied"
                                    );
                                }
                                last = Some((next.upstreams, next.inbound, Arc::clone(&config)));
                                consumer.applied(&indexes, note);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "config from the registry refused");
                                consumer.applied(&indexes, Some(e.to_string()));
                            }
                        }
                    }
                }
                Err(why) => {
                    tracing::warn!(error = %why, "config from the registry refused; keeping the current settings");
                    consumer.applied(&indexes, Some(why));
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = defaults.changed() => if changed.is_err() { return },
            changed = global.changed() => if changed.is_err() { return },
            ok = changed(ingress.as_mut()) => if !ok { return },
            ok = changed(jwt_providers.as_mut()) => if !ok { return },
            changed = file.changed() => if changed.is_err() { return },
        }
    }
}
