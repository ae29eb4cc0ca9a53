//! Cluster status in Consul's shapes: `/v1/status/*`,
//! `/v1/operator/raft/*`, `/v1/agent/self` and `/v1/agent/members`.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::authz::Authz;
use super::error::ApiError;
use super::query::Params;
use crate::auth::{Kind, Need, Single};

/// `GET /v1/status/leader`: the leader's Raft address, `""` if none.
pub async fn leader(State(app): State<AppState>) -> Json<String> {
    Json(app.node.leader().map(|(_, addr)| addr).unwrap_or_default())
}

/// `GET /v1/status/peers`: the voters' Raft addresses.
pub async fn peers(State(app): State<AppState>) -> Json<Vec<String>> {
    Json(
        app.node
            .members()
            .into_iter()
            .filter(|m| m.voter)
            .map(|m| m.raft_addr)
            .collect(),
    )
}

/// `GET /v1/operator/raft/configuration`.
pub async fn raft_configuration(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    authz.require_single(Single::Operator, Need::Read)?;
    // A leader read by default (as Consul), so a change just made through
    // any server is visible; `?stale` answers from this server's view.
    let options = super::query::ReadOptions::from_params(&Params::parse(query.as_deref()))?;
    app.node.read_barrier(options.consistency).await?;
    let leader = app.node.leader().map(|(id, _)| id);
    let servers: Vec<Value> = app
        .node
        .members()
        .into_iter()
        .map(|m| {
            json!({
                "ID": m.id.to_string(),
                "Node": m.display_name(),
                "Address": m.raft_addr,
                "Leader": Some(m.id) == leader,
                "Voter": m.voter,
                "ProtocolVersion": "3",
            })
        })
        .collect();
    Ok(Json(
        json!({ "Servers": servers, "Index": app.node.membership_index() }),
    ))
}

/// `DELETE /v1/operator/raft/peer?id=N` (or `?address=HOST:PORT`).
pub async fn remove_peer(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authz.require_single(Single::Operator, Need::Write)?;
    let params = Params::parse(query.as_deref());
    let id = match (params.get("id"), params.get("address")) {
        (Some(id), _) => id.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "Invalid id {id:?}: server ids are positive integers"
            ))
        })?,
        (None, Some(addr)) => app
            .node
            .members()
            .into_iter()
            .find(|m| m.raft_addr == addr)
            .map(|m| m.id)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "No server with address {addr:?} in the Raft configuration"
                ))
            })?,
        (None, None) => {
            return Err(ApiError::bad_request(
                "Must specify either ?id with the server's ID or ?address with IP:port of peer to remove",
            ));
        }
    };
    app.node.remove_server(id).await?;
    Ok(().into_response())
}

/// `PUT /v1/operator/raft/peer?id=N&address=HOST:PORT` (a Meshwork
/// extension; Consul joins through Serf): adds the server with that id
/// and Raft address, as a learner until it has caught up, then as a voter.
pub async fn add_peer(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authz.require_single(Single::Operator, Need::Write)?;
    let params = Params::parse(query.as_deref());
    let (Some(id), Some(address)) = (params.get("id"), params.get("address")) else {
        return Err(ApiError::bad_request(
            "Must specify ?id with the new server's ID and ?address with its Raft IP:port",
        ));
    };
    let id = id.parse::<u64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::bad_request(format!(
            "Invalid id {id:?}: server ids are positive integers"
        ))
    })?;
    if address.parse::<std::net::SocketAddr>().is_err()
        && address
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(ApiError::bad_request(format!(
            "Invalid address {address:?}: want HOST:PORT of the server's Raft listener"
        )));
    }
    app.node.add_server(id, address.to_owned()).await?;
    Ok(().into_response())
}

/// `GET /v1/operator/autopilot/health`: every server's health as the
/// leader sees it (Consul's shape); 429 when the cluster is unhealthy, as
/// Consul, so load balancers and scripts can check the status alone.
pub async fn autopilot_health(
    State(app): State<AppState>,
    authz: Authz,
) -> Result<Response, ApiError> {
    authz.require_single(Single::Operator, Need::Read)?;
    let servers = app.node.server_health().await?;
    let voters = servers.iter().filter(|s| s.voter).count();
    let healthy_voters = servers.iter().filter(|s| s.voter && s.healthy).count();
    let quorum = voters / 2 + 1;
    let healthy = servers.iter().all(|s| s.healthy);
    let body = json!({
        "Healthy": healthy,
        "FailureTolerance": healthy_voters.saturating_sub(quorum),
        "Servers": servers.iter().map(|s| json!({
            "ID": s.id.to_string(),
            "Name": crate::cluster::display_name(s.id, s.name.as_deref()),
            "Version": s.version.clone().unwrap_or_default(),
            "Address": s.raft_addr,
            "Leader": s.leader,
            "Voter": s.voter,
            // Go's time.ParseDuration must read it (Consul's Go client
            // does): a server never heard from shows as "-1ns".
            "LastContact": s.last_contact_ms.map_or_else(|| "-1ns".to_owned(), go_duration_ms),
            "LastTerm": s.last_term,
            "LastIndex": s.last_index,
            "Healthy": s.healthy,
        })).collect::<Vec<_>>(),
    });
    let status = if healthy {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::TOO_MANY_REQUESTS
    };
    Ok((status, Json(body)).into_response())
}

/// Milliseconds as Go prints a `time.Duration` ("0s", "12ms", "1.5s").
fn go_duration_ms(ms: u64) -> String {
    match ms {
        0 => "0s".to_owned(),
        1..=999 => format!("{ms}ms"),
        _ => format!("{}s", ms as f64 / 1000.0),
    }
}

/// `PUT /v1/operator/raft/snapshot` (a Meshwork extension): this server
/// builds a Raft snapshot now and compacts its log behind it, instead of
/// waiting for `--snapshot-threshold`; answers the snapshot's index once
/// it is written (or 500 if that takes over 60 s).
pub async fn take_snapshot(
    State(app): State<AppState>,
    authz: Authz,
) -> Result<Response, ApiError> {
    authz.require_single(Single::Operator, Need::Write)?;
    static TAKING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let Ok(_one_at_a_time) = TAKING.try_lock() else {
        return Err(ApiError::Conflict(
            "A snapshot requested through the API is being taken on this server; try again when it is done".into(),
        ));
    };
    let mut metrics = app.node.raft.metrics();
    let applied = app.node.state.applied_index();
    if let Some(existing) = metrics.borrow().snapshot
        && existing.index >= applied
    {
        // Nothing applied since the last one.
        return Ok(Json(json!({ "Index": existing.index })).into_response());
    }
    app.node
        .raft
        .trigger()
        .snapshot()
        .await
        .map_err(|e| ApiError::Internal(format!("cannot start a snapshot: {e}")))?;
    let built = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        metrics.wait_for(|m| m.snapshot.is_some_and(|s| s.index >= applied)),
    )
    .await;
    match built {
        Ok(Ok(m)) => {
            Ok(Json(json!({ "Index": m.snapshot.map_or(0, |s| s.index) })).into_response())
        }
        Ok(Err(_)) => Err(ApiError::Internal("the Raft core stopped".into())),
        Err(_) => Err(ApiError::Internal(
            "the snapshot was not written within 60 s; see the server log".into(),
        )),
    }
}

/// `GET /v1/agent/self`: what Consul clients read on start.
pub async fn agent_self(
    State(app): State<AppState>,
    authz: Authz,
) -> Result<Json<Value>, ApiError> {
    authz.require(Kind::Agent, &app.node_name, Need::Read)?;
    let (host, port) = app
        .node_raft_addr
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse::<u16>().unwrap_or(0)))
        .unwrap_or_else(|| (app.node_raft_addr.clone(), 0));
    Ok(Json(json!({
        "Config": {
            "Datacenter": app.datacenter,
            // Nanoseconds, as Consul's older agents reported it (Patroni
            // reads it to fit its session TTL).
            "SessionTTLMin": super::session::TTL_MIN.as_nanos() as u64,
            "PrimaryDatacenter": app.datacenter,
            "NodeName": app.node_name,
            "NodeID": app.node_uuid,
            "Server": true,
            "Revision": "",
            "Version": env!("CARGO_PKG_VERSION"),
            "BuildDate": "",
        },
        "DebugConfig": {},
        "Coord": null,
        "Member": {
            "Name": app.node_name,
            "Addr": host,
            "Port": port,
            "Tags": {
                "role": "consul",
                "dc": app.datacenter,
                "id": app.node_uuid,
                "vsn": "2",
                "build": concat!(env!("CARGO_PKG_VERSION"), ":meshwork"),
                "raft_vsn": "3",
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        },
        "Stats": {
            "raft": {
                "applied_index": app.node.state.applied_index().to_string(),
                "state": if app.node.is_leader() { "Leader" } else { "Follower" },
            }
        },
        "Meta": {},
        "xDS": null,
    })))
}

/// Serf's member status numbers (`serf.MemberStatus`).
const ALIVE: u8 = 1;
const FAILED: u8 = 4;
/// Status of a server whose health is unknown (no leader to ask).
const UNKNOWN: u8 = 0;

/// `GET /v1/agent/members`: Consul's gossip members, without gossip. The
/// servers are the Raft configuration, alive when the leader reports them
/// healthy (with no leader, only this server is known to be alive); the
/// other members are the nodes sidecars run on, alive while their session
/// check passes, failed when it is critical. Nodes registered through the
/// catalog API alone are not members (as in Consul: they run no agent).
/// `?wan` lists the servers as `name.dc`.
pub async fn agent_members(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Value>>, ApiError> {
    let params = Params::parse(query.as_deref());
    let wan = params.get("wan").is_some_and(|v| !v.is_empty());
    match params.get("segment") {
        None | Some("" | "_all") => {}
        Some(_) if wan => {
            return Err(ApiError::bad_request(
                "Cannot provide a segment with wan=true",
            ));
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "?segment={other}: network segments are a Consul Enterprise feature; \
                 Meshwork has the default one only"
            )));
        }
    }
    let health = tokio::time::timeout(std::time::Duration::from_secs(1), app.node.server_health())
        .await
        .ok()
        .and_then(Result::ok);
    let mut members = Vec::new();
    for server in app.node.members() {
        let status = match &health {
            Some(servers) => servers
                .iter()
                .find(|s| s.id == server.id)
                .map_or(UNKNOWN, |s| if s.healthy { ALIVE } else { FAILED }),
            None if server.id == app.node.id => ALIVE,
            None => UNKNOWN,
        };
        let name = server.display_name();
        let (host, port) = split_addr(&server.raft_addr);
        members.push(member_json(
            &if wan {
                format!("{name}.{}", app.datacenter)
            } else {
                name
            },
            &host,
            port,
            json!({
                "role": "consul",
                "dc": app.datacenter,
                "port": port.to_string(),
                "vsn": "2",
                "raft_vsn": "3",
                "build": concat!(env!("CARGO_PKG_VERSION"), ":meshwork"),
            }),
            status,
        ));
    }
    if !wan {
        let state = app.node.state.read();
        let servers: Vec<String> = members
            .iter()
            .filter_map(|m| m["Name"].as_str().map(str::to_owned))
            .collect();
        for node in state.catalog.nodes() {
            let Some(check) = state
                .catalog
                .node_checks(&node.name)
                .find(|c| c.check_id == crate::state::catalog::SESSION_CHECK_ID)
            else {
                continue;
            };
            if servers.contains(&node.name) {
                continue;
            }
            let status = if check.status == crate::state::catalog::HealthStatus::Critical {
                FAILED
            } else {
                ALIVE
            };
            members.push(member_json(
                &node.name,
                &node.address,
                0,
                json!({ "role": "node", "dc": app.datacenter }),
                status,
            ));
        }
    }
    // Members are nodes: the token sees those it may read.
    members.retain(|m| {
        let name = m["Name"].as_str().unwrap_or_default();
        let node = if wan {
            name.strip_suffix(&format!(".{}", app.datacenter))
                .unwrap_or(name)
        } else {
            name
        };
        authz.allows(Kind::Node, node, Need::Read)
    });
    Ok(Json(members))
}

fn split_addr(addr: &str) -> (String, u16) {
    addr.rsplit_once(':').map_or_else(
        || (addr.to_owned(), 0),
        |(h, p)| {
            (
                h.trim_matches(|c| c == '[' || c == ']').to_owned(),
                p.parse().unwrap_or(0),
            )
        },
    )
}

/// One member in serf's shape.
fn member_json(name: &str, addr: &str, port: u16, tags: Value, status: u8) -> Value {
    json!({
        "Name": name,
        "Addr": addr,
        "Port": port,
        "Tags": tags,
        "Status": status,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    })
}
