//! The registry's defaults for this sidecar's upstreams and its inbound
//! listener: its service's `service-defaults` `UpstreamConfig` and
//! `LocalConnectTimeoutMs` / `LocalRequestTimeoutMs` /
//! `MaxInboundConnections`, each upstream's own `service-defaults`
//! `Protocol` and the `proxy-defaults` entry `global`
//! (`meshwork_core::upstream_defaults`), applied under the config file
//! (what the file gives wins) through the proxy's reload: settings change
//! in place, a protocol change replaces the listener's route as a SIGHUP
//! reload would. A reload of the file applies them too ([`effective`]).
//! The effective settings, and where each came from, show in `/config`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use meshwork_core::chain::Entries;
use meshwork_proto::v1::ConfigEntry;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::applied::AppliedConfig;
use crate::config::Config;
use crate::discovery::{Discovery, TopicState};
use crate::listener::Proxy;

const KINDS: [&str; 2] = ["service-defaults", "proxy-defaults"];

type State = Arc<TopicState<BTreeMap<String, ConfigEntry>>>;

/// The two kinds' entries as the core reads them.
struct Bodies(HashMap<(&'static str, String), Map<String, Value>>);

impl Entries for Bodies {
    fn entry(&self, kind: &str, name: &str) -> Option<&Map<String, Value>> {
        let kind = KINDS.iter().find(|k| **k == kind)?;
        self.0.get(&(*kind, name.to_owned()))
    }
}

fn bodies(states: &[State; 2]) -> Result<Bodies, String> {
    let mut out = HashMap::new();
    for (kind, state) in KINDS.iter().zip(states) {
        for (name, entry) in &state.value {
            out.insert((*kind, name.clone()), super::entry_body(entry)?);
        }
    }
    Ok(Bodies(out))
}

/// `config` with the registry's defaults applied to its upstreams, from
/// the entries as last seen (`None` until both kinds' first snapshots
/// came: then the file alone).
pub fn effective(config: &Config, discovery: &Discovery) -> Result<Config, String> {
    let states = KINDS.map(|k| Arc::clone(&discovery.config_entries(k).borrow()));
    if !states.iter().all(|s| s.ready) {
        return Ok(config.clone());
    }
    apply(config, &states)
}

fn apply(config: &Config, states: &[State; 2]) -> Result<Config, String> {
    let bodies = bodies(states)?;
    let mut out = config.clone();
    for upstream in &mut out.upstreams {
        let defaults = meshwork_core::upstream_defaults::for_upstream(
            &config.service_name,
            &upstream.name,
            &bodies,
        )?;
        *upstream = upstream.with_defaults(&defaults);
    }
    if let Some(inbound) = &mut out.inbound {
        let defaults =
            meshwork_core::upstream_defaults::for_inbound(&config.service_name, &bodies)?;
        *inbound = inbound.with_defaults(&defaults);
    }
    Ok(out)
}

/// What a reload would change: the upstreams and the inbound listener.
type Applied = (Vec<crate::config::Upstream>, Option<crate::config::Inbound>);

/// Follows the two kinds and the config file in use (`file`: the agent's
/// channel, which a reload updates) until `shutdown`, reloading the proxy
/// when the effective upstreams or inbound listener change.
pub async fn run(
    proxy: Arc<Proxy>,
    mut file: watch::Receiver<Arc<Config>>,
    discovery: Discovery,
    applied: AppliedConfig,
    shutdown: CancellationToken,
) {
    let mut kinds = KINDS.map(|k| discovery.config_entries(k));
    let consumer = applied.consumer("proxy defaults", &KINDS);
    let mut last: Option<Applied> = None;
    loop {
        let states = kinds.each_mut().map(|k| Arc::clone(&k.borrow_and_update()));
        let config = Arc::clone(&file.borrow_and_update());
        if states.iter().all(|s| s.ready) {
            let indexes = [(KINDS[0], states[0].index), (KINDS[1], states[1].index)];
            match apply(&config, &states) {
                Ok(next)
                    if last
                        .as_ref()
                        .is_some_and(|(u, i)| *u == next.upstreams && *i == next.inbound) =>
                {
                    consumer.applied(&indexes, None);
                }
                Ok(next) => match proxy.reload(&next).await {
                    Ok(changes) => {
                        if !(changes.replaced.is_empty() && changes.reconfigured.is_empty()) {
                            tracing::info!(
                                replaced = ?changes.replaced,
                                reconfigured = ?changes.reconfigured,
                                "proxy defaults from the registry applied"
                            );
                        }
                        last = Some((next.upstreams, next.inbound));
                        consumer.applied(&indexes, None);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "proxy defaults from the registry refused");
                        consumer.applied(&indexes, Some(e.to_string()));
                    }
                },
                Err(why) => {
                    tracing::warn!(error = %why, "proxy defaults from the registry refused; keeping the current settings");
                    consumer.applied(&indexes, Some(why));
                }
            }
        }
        let [a, b] = &mut kinds;
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = a.changed() => if changed.is_err() { return },
            changed = b.changed() => if changed.is_err() { return },
            changed = file.changed() => if changed.is_err() { return },
        }
    }
}
