//! Meshwork's own fleet views: `GET /v1/mesh/sidecars` (every sidecar,
//! the config it has applied, what it refused) and
//! `GET /v1/mesh/propagation?index=N` (has every connected sidecar applied
//! config index N?).
//!
//! Each server knows the sidecars that report to it
//! ([`crate::telemetry::sidecars`]); an answer merges every server's
//! table, asked over the internal port. A server that does not answer is
//! named in `Unreachable`, and a propagation is never called complete
//! while one is (its sidecars are unknown). A sidecar is listed while its
//! instance is in the catalog (a killed one drops out once its session
//! expires and the instance is removed), and counted in propagations while
//! it reports (within the last 30 s).

use std::collections::{BTreeMap, HashMap};

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use meshwork_proto::v1::SidecarReport;
use serde_json::{Value, json};

use super::AppState;
use super::authz::Authz;
use super::error::ApiError;
use super::query::Params;
use crate::api::fleet::Listed;
use crate::auth::{Kind, Need, Resolved, Single};
use crate::telemetry::sidecars::{DISCONNECTED_AFTER, pending_kinds};

/// How often a waiting query asks the peers again (their sidecars'
/// reports reach only them).
const PEER_POLL: Duration = Duration::from_millis(100);
/// `/v1/mesh/propagation`'s wait when none is given, and the longest.
const DEFAULT_PROPAGATION_WAIT: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Every server's sidecars, merged (a sidecar listed by two servers,
/// having moved, keeps its freshest report), those `authz` may not read
/// left out; the servers that did not answer; and a number that changes
/// when any server's table does.
struct Fleet {
    sidecars: Vec<Listed>,
    unreachable: Vec<String>,
    filtered: bool,
    generation: u64,
}

fn connected(sidecar: &Listed) -> bool {
    sidecar.age < DISCONNECTED_AFTER
}

async fn gather(app: &AppState, authz: &Resolved) -> Fleet {
    let tables = crate::api::fleet::tables(&app.node, &app.sidecars, &app.node_name).await;
    let mut sidecars = crate::api::fleet::freshest(tables.sidecars);
    // A sidecar whose instance is gone from the catalog (deregistered, or
    // removed after its session expired: killed without a goodbye) is not
    // part of the mesh any more.
    {
        let state = app.node.state.read();
        sidecars.retain(|s| {
            state
                .catalog
                .service(&s.report.node, &s.report.service_id)
                .is_some()
        });
    }
    let before = sidecars.len();
    sidecars.retain(|s| {
        authz.allows(Kind::Service, &s.report.service, Need::Read)
            && authz.allows(Kind::Node, &s.report.node, Need::Read)
    });
    let filtered = sidecars.len() != before;
    sidecars.sort_by(|a, b| {
        (&a.report.service, &a.report.node, &a.report.service_id).cmp(&(
            &b.report.service,
            &b.report.node,
            &b.report.service_id,
        ))
    });
    Fleet {
        sidecars,
        unreachable: tables.unreachable,
        filtered,
        generation: tables.generation,
    }
}

/// The highest config index `report` has applied, judged with the
/// kinds' last changes: its lowest applied index among the kinds it
/// trails, or `state_index` when it trails none.
fn applied_index(
    report: &SidecarReport,
    state_index: u64,
    kind_index: &dyn Fn(&str) -> u64,
) -> u64 {
    report
        .applied
        .iter()
        .filter(|(kind, applied)| **applied < kind_index(kind))
        .map(|(_, applied)| *applied)
        .min()
        .unwrap_or(state_index)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A refusal's reason is the sidecar's compiler's message, which may quote
/// any entry of the chain (another service's resolver, a subset of a
/// redirect's target): it is shown to tokens that may read every
/// service's entries (`service_prefix ""` read) or `operator:read`; others
/// get the scope and index, and this in place of the reason.
const REASON_WITHHELD: &str = "withheld: a refusal's reason may quote other services' config entries; it is shown to tokens with service:read on every service or operator:read";

fn refused_json(report: &SidecarReport, authz: &Resolved) -> Vec<Value> {
    let may_read_reasons = authz.allows_prefix(Kind::Service, "", Need::Read)
        || authz.allows_single(Single::Operator, Need::Read);
    report
        .refused
        .iter()
        .map(|r| {
            let reason = if may_read_reasons {
                r.reason.as_str()
            } else {
                REASON_WITHHELD
            };
            json!({ "Scope": r.scope, "Reason": reason, "Index": r.index })
        })
        .collect()
}

/// The `wait` parameter (a Consul duration), bounded.
fn wait_param(params: &Params, default: Duration) -> Result<Duration, ApiError> {
    match params.get("wait") {
        None | Some("") => Ok(default),
        Some(text) => meshwork_core::duration::parse_duration(text)
            .map(|d| d.min(MAX_WAIT))
            .ok_or_else(|| ApiError::bad_request(format!("Invalid wait time: {text:?}"))),
    }
}

/// Waits until `deadline` for a change that may alter the answer: a
/// report to this server, an applied write, or the peers' poll period.
async fn wait_for_change(app: &AppState, deadline: tokio::time::Instant) {
    let mut local = app.sidecars.changes();
    let mut state = app.node.state.subscribe();
    let next = (tokio::time::Instant::now() + PEER_POLL).min(deadline);
    tokio::select! {
        _ = local.changed() => {}
        _ = state.changed() => {}
        () = tokio::time::sleep_until(next) => {}
        () = app.shutdown.cancelled() => {}
    }
}

/// `GET /v1/mesh/sidecars[?index=N&wait=D]`: every sidecar reporting to
/// any server, with the config index it has applied. The index
/// (`X-Consul-Index`) is a number that changes when the listing does;
/// `?index=` blocks until it differs (or `wait` passes).
pub async fn sidecars(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let min_index = params.u64("index")?;
    let wait = wait_param(&params, Duration::from_secs(300))?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let resolved = authz.refresh()?;
        let fleet = gather(&app, &resolved).await;
        let (state_index, kind_indexes) = kind_indexes(&app, &fleet);
        let disconnected = fleet.sidecars.iter().filter(|s| !connected(s)).count() as u64;
        let index = fleet
            .generation
            .wrapping_add(kind_indexes.values().copied().max().unwrap_or(0))
            .wrapping_add(disconnected)
            .max(1);
        let done = min_index.is_none_or(|m| m != index)
            || tokio::time::Instant::now() >= deadline
            || app.shutdown.is_cancelled();
        if !done {
            wait_for_change(&app, deadline).await;
            continue;
        }
        let kind_index = |kind: &str| kind_indexes.get(kind).copied().unwrap_or(0);
        let listed: Vec<Value> = fleet
            .sidecars
            .iter()
            .map(|s| {
                let r = &s.report;
                json!({
                    "Node": r.node,
                    "Service": r.service,
                    "ServiceID": r.service_id,
                    "Address": r.address,
                    "Version": r.version,
                    "Mode": r.mode,
                    "Server": s.server,
                    "Connected": connected(s),
                    "LastReportMs": millis(s.age),
                    "AppliedIndex": applied_index(r, state_index, &kind_index),
                    "Applied": r.applied.iter().collect::<BTreeMap<_, _>>(),
                    "Refused": refused_json(r, &resolved),
                    "ConfigDigest": r.config_digest,
                    "ConfigLoadedUnix": r.config_loaded_unix,
                })
            })
            .collect();
        let mut response = Json(json!({
            "Index": state_index,
            "Sidecars": listed,
            "Unreachable": fleet.unreachable,
        }))
        .into_response();
        response
            .headers_mut()
            .insert("X-Consul-Index", HeaderValue::from(index));
        super::authz::mark_filtered(response.headers_mut(), fleet.filtered);
        return Ok(response);
    }
}

/// This server's applied index and the last change of every kind the
/// fleet follows.
fn kind_indexes(app: &AppState, fleet: &Fleet) -> (u64, HashMap<String, u64>) {
    let index = app.node.state.applied_index();
    let state = app.node.state.read();
    let mut kinds = HashMap::new();
    for kind in fleet.sidecars.iter().flat_map(|s| s.report.applied.keys()) {
        if !kinds.contains_key(kind) {
            kinds.insert(kind.clone(), state.config.kind_index(kind));
        }
    }
    (index, kinds)
}

/// `GET /v1/mesh/propagation?index=N[&wait=D]`: waits (10 s by default)
/// until every connected sidecar has applied config index `N` (and this
/// server's state has reached it), then answers `Complete: true`;
/// otherwise, when the wait is over, `Complete: false` with the sidecars
/// still behind, what they refused and the servers that did not answer.
/// Sidecars the token may not read are not counted.
pub async fn propagation(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let index = params.u64("index")?.ok_or_else(|| {
        ApiError::bad_request("?index=N is required: the config index to wait for")
    })?;
    let wait = wait_param(&params, DEFAULT_PROPAGATION_WAIT)?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let resolved = authz.refresh()?;
        let fleet = gather(&app, &resolved).await;
        let (state_index, kind_indexes) = kind_indexes(&app, &fleet);
        let kind_index = |kind: &str| kind_indexes.get(kind).copied().unwrap_or(0);
        let connected: Vec<&Listed> = fleet.sidecars.iter().filter(|s| connected(s)).collect();
        let mut pending = Vec::new();
        let mut refused = Vec::new();
        for sidecar in &connected {
            let r = &sidecar.report;
            let behind = pending_kinds(r, index, kind_index);
            if !behind.is_empty() {
                pending.push(json!({
                    "Node": r.node,
                    "Service": r.service,
                    "ServiceID": r.service_id,
                    "Server": sidecar.server,
                    "AppliedIndex": applied_index(r, state_index, &kind_index),
                    "Kinds": behind,
                }));
            }
            if !r.refused.is_empty() {
                refused.push(json!({
                    "Node": r.node,
                    "Service": r.service,
                    "ServiceID": r.service_id,
                    "Refused": refused_json(r, &resolved),
                }));
            }
        }
        let reached = state_index >= index;
        let complete =
            reached && pending.is_empty() && refused.is_empty() && fleet.unreachable.is_empty();
        if complete || tokio::time::Instant::now() >= deadline || app.shutdown.is_cancelled() {
            let applied = connected.len() - pending.len();
            let mut response = Json(json!({
                "Index": index,
                "Complete": complete,
                "ServerIndex": state_index,
                "Sidecars": connected.len(),
                "Applied": applied,
                "Pending": pending,
                "Refused": refused,
                "Unreachable": fleet.unreachable,
                "ElapsedMs": millis(started.elapsed()),
            }))
            .into_response();
            super::authz::mark_filtered(response.headers_mut(), fleet.filtered);
            return Ok(response);
        }
        wait_for_change(&app, deadline).await;
    }
}

/// `GET /v1/mesh/topology?window=1m`: who calls whom over the window
/// (10 s to 15 m, default 1 m), from every server's table of its
/// sidecars' traffic ([`crate::telemetry::topology`]), summed per edge:
/// `Services` (calls into each service, from its own sidecars) and
/// `Edges` (a caller's sidecars' calls to a service), each with requests
/// a second, error rate and p50/p99 latency in milliseconds. A server
/// that does not answer is named in `Unreachable` (its sidecars' traffic
/// is missing). Only services the token may read are shown.
pub async fn topology(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    use crate::telemetry::topology::{KEPT, SLOT, summary};
    let params = Params::parse(query.as_deref());
    let window = match params.get("window") {
        None => Duration::from_secs(60),
        Some(text) => meshwork_core::duration::parse_duration(text)
            .filter(|w| *w >= SLOT && *w <= KEPT)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "window: {text:?}: a duration from 10s to 15m (\"1m\")"
                ))
            })?,
    };
    let resolved = authz.refresh()?;
    let (mut edges, mut covered) = app.sidecars.topology().window(window);
    let mut unreachable = Vec::new();
    let asks = app
        .node
        .members()
        .into_iter()
        .filter(|m| m.id != app.node.id)
        .map(|member| {
            let node = &app.node;
            async move {
                let answer = async {
                    let mut client = node.channels.client(&member.raft_addr).ok()?;
                    let request = node
                        .channels
                        .request(meshwork_proto::v1::LocalTopologyRequest {
                            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
                        });
                    let reply = tokio::time::timeout(
                        Duration::from_secs(1),
                        client.local_topology(request),
                    )
                    .await;
                    node.channels.outcome(&member.raft_addr, reply.is_ok());
                    Some(reply.ok()?.ok()?.into_inner())
                }
                .await;
                (member, answer)
            }
        });
    for (member, answer) in futures::future::join_all(asks).await {
        match answer {
            Some(reply) => {
                edges.extend(reply.edges);
                covered = covered.max(reply.covered_seconds);
            }
            None => unreachable.push(member.display_name()),
        }
    }
    unreachable.sort();
    // Sum each edge over the servers.
    let mut merged: BTreeMap<(String, String, String), meshwork_proto::v1::TopologyEdge> =
        BTreeMap::new();
    for e in edges {
        let key = (e.source.clone(), e.direction.clone(), e.service.clone());
        match merged.get_mut(&key) {
            None => {
                merged.insert(key, e);
            }
            Some(sum) => {
                for (s, n) in sum.by_class.iter_mut().zip(&e.by_class) {
                    *s += n;
                }
                if sum.latency_le_us == e.latency_le_us {
                    for (s, n) in sum.latency_counts.iter_mut().zip(&e.latency_counts) {
                        *s += n;
                    }
                }
            }
        }
    }
    let reads = |name: &str| resolved.allows(Kind::Service, name, Need::Read);
    let mut filtered = false;
    let mut services = Vec::new();
    let mut calls = Vec::new();
    for ((source, direction, service), e) in &merged {
        let (rate, errors, p50, p99) = summary(e, covered);
        let stats = json!({
            "RequestsPerSecond": rate,
            "ErrorRate": errors,
            "P50Ms": p50.filter(|v| v.is_finite()),
            "P99Ms": p99.filter(|v| v.is_finite()),
            "Requests": e.by_class.iter().sum::<u64>(),
        });
        if direction == "inbound" {
            if !reads(service) {
                filtered = true;
                continue;
            }
            let mut v = json!({"Name": service});
            merge_json(&mut v, stats);
            services.push(v);
        } else {
            if !reads(service) || !reads(source) {
                filtered = true;
                continue;
            }
            let mut v = json!({"Source": source, "Destination": service});
            merge_json(&mut v, stats);
            calls.push(v);
        }
    }
    let body = json!({
        "WindowSeconds": window.as_secs_f64(),
        "CoveredSeconds": covered,
        "Services": services,
        "Edges": calls,
        "Unreachable": unreachable,
        "DroppedEdges": app.sidecars.topology().dropped_edges.load(std::sync::atomic::Ordering::Relaxed),
    });
    let mut response = Json(body).into_response();
    if filtered {
        response.headers_mut().insert(
            "x-consul-results-filtered-by-acls",
            HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

fn merge_json(into: &mut Value, more: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), more) {
        a.extend(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_shown_only_to_who_may_read_every_service() {
        let report = SidecarReport {
            refused: vec![meshwork_proto::v1::RefusedEntry {
                scope: "upstream api".into(),
                reason: "service-resolver \"billing\".Subsets: secret-subset".into(),
                index: 7,
            }],
            ..Default::default()
        };
        let reason = |rules: &str| {
            let authz = Resolved::with_rules(rules).expect("rules");
            refused_json(&report, &authz)[0]["Reason"]
                .as_str()
                .map(str::to_owned)
        };
        let one_service = reason(r#"service "api" { policy = "read" }"#);
        assert_eq!(one_service.as_deref(), Some(REASON_WITHHELD));
        let all = reason(r#"service_prefix "" { policy = "read" }"#);
        assert!(all.is_some_and(|r| r.contains("billing")));
        let operator = reason(r#"operator = "read""#);
        assert!(operator.is_some_and(|r| r.contains("billing")));
        let authz = Resolved::with_rules(r#"service "api" { policy = "read" }"#).expect("rules");
        let shown = refused_json(&report, &authz);
        assert_eq!(shown[0]["Scope"], "upstream api");
        assert_eq!(shown[0]["Index"], 7);
    }

    #[test]
    fn the_applied_index_is_held_back_only_by_kinds_that_changed_since() {
        let report = SidecarReport {
            applied: [
                ("service-router".into(), 40),
                ("service-splitter".into(), 50),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let kinds = |kind: &str| if kind == "service-router" { 40 } else { 55 };
        assert_eq!(applied_index(&report, 70, &kinds), 50);
        let caught_up = |kind: &str| if kind == "service-router" { 40 } else { 50 };
        assert_eq!(applied_index(&report, 70, &caught_up), 70);
    }
}
