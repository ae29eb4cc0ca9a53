//! `/v1/session/*`: Consul's sessions, the leases that KV locks are held
//! under (leader election for Patroni, Vault, `consul lock` and every lock
//! recipe of the Consul clients).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::AppState;
use super::authz::{Authz, mark_filtered};
use super::consul_json::{Fields, printable};
use super::error::ApiError;
use super::query::{Params, ReadOptions, read_headers, run_read};
use super::waiters::IndexOf;
use crate::auth::{Kind, Need};
use crate::cluster::Consistency;
use crate::command::{Command, CommandResponse};
use crate::state::State as RegistryState;
use crate::state::catalog::{Registration, SESSION_CHECK_ID};
use crate::state::session::{Behavior, Session, SessionSpec};

/// Shortest and longest session TTL (Consul's `session_ttl_min` and its
/// fixed maximum).
pub const TTL_MIN: Duration = Duration::from_secs(10);
pub const TTL_MAX: Duration = Duration::from_secs(86_400);
/// Lock-delay when the client names none (Consul's).
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// Consul's name for a node's liveness check; here, a sidecar node's
/// session check (a registry server's own node has none).
const SERF_HEALTH: &str = "serfHealth";

/// `PUT /v1/session/create`.
pub async fn create(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut f = if body.iter().all(u8::is_ascii_whitespace) {
        Fields::from_value("session", Value::Null)?
    } else {
        Fields::from_body("session", &body)?
    };
    let name = f.string("name")?;
    if name.len() > MAX_NAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "Session name is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    printable("session name", &name)?;
    let node = match f.string("node")? {
        n if n.is_empty() => app.node_name.to_string(),
        n => n,
    };
    printable("node name", &node)?;
    authz.require(Kind::Session, &node, Need::Write)?;
    // Consul's defaults and quirks (its `fixupEmptySessionChecks`): no
    // check field means the node's liveness check (`serfHealth`);
    // `"Checks": []` or `null`, or `"NodeChecks": []`, means none;
    // `Checks` (older clients) adds to the default `NodeChecks` unless
    // `NodeChecks` is given empty.
    let checks_given = f.given("checks");
    let checks = f.strings("checks")?;
    let node_checks = if f.given("nodechecks") {
        f.strings("nodechecks")?
    } else {
        vec![SERF_HEALTH.to_owned()]
    };
    let node_checks = match (checks_given, checks.is_empty(), node_checks.is_empty()) {
        (true, true, _) | (true, false, true) => Vec::new(),
        (true, false, false) => {
            let mut all = checks;
            for check in node_checks {
                if !all.contains(&check) {
                    all.push(check);
                }
            }
            all
        }
        (false, ..) => node_checks,
    };
    let mut service_checks = Vec::new();
    for mut check in f.objects("servicechecks", "session service check")? {
        let id = check.string("id")?;
        check.ignore(&["namespace"]);
        check.finish()?;
        if id.is_empty() {
            return Err(ApiError::bad_request("Missing service check ID"));
        }
        service_checks.push(id);
    }
    // Each check is looked up on every change to the node's checks, in
    // every server's apply: de-duplicated and bounded.
    let mut node_checks = node_checks;
    dedup(&mut node_checks);
    dedup(&mut service_checks);
    if node_checks.len() + service_checks.len() > MAX_CHECKS {
        return Err(ApiError::bad_request(format!(
            "A session may name at most {MAX_CHECKS} checks"
        )));
    }
    for id in node_checks.iter().chain(&service_checks) {
        printable("check ID", id)?;
    }
    let lock_delay = lock_delay(&mut f)?;
    // Consul reports these as server errors (500), with these messages;
    // clients such as Patroni match on them.
    let behavior = match f.string("behavior")?.as_str() {
        "" | "release" => Behavior::Release,
        "delete" => Behavior::Delete,
        other => {
            return Err(ApiError::Internal(format!(
                "Invalid Behavior setting '{other}'"
            )));
        }
    };
    let ttl = f.string("ttl")?;
    if !ttl.is_empty() {
        // A unit is required, as Go's time.ParseDuration does ("20" is
        // no TTL Consul accepts).
        let parsed = Some(ttl.as_str())
            .filter(|t| t.ends_with(|c: char| c.is_ascii_alphabetic()))
            .and_then(meshwork_core::duration::parse_duration)
            .ok_or_else(|| {
                ApiError::Internal(format!(
                    "Session TTL '{ttl}' invalid: not a duration like \"30s\""
                ))
            })?;
        if parsed != Duration::ZERO && !(TTL_MIN..=TTL_MAX).contains(&parsed) {
            return Err(ApiError::Internal(format!(
                "Invalid Session TTL '{}', must be between [10s=24h0m0s]",
                parsed.as_nanos()
            )));
        }
    }
    // Unknown fields are ignored, as Consul's decoder does.

    app.node.read_barrier(Consistency::Default).await?;
    let (node_checks, register_node) = {
        let state = app.node.state.read();
        let liveness = state
            .catalog
            .node_checks(&node)
            .any(|c| c.check_id == SESSION_CHECK_ID)
            .then(|| SESSION_CHECK_ID.to_owned());
        // `serfHealth` stands for the node's liveness check: a sidecar
        // node's session check; a registry server's own node has none
        // (it is alive while it serves this request).
        let node_checks: Vec<String> = node_checks
            .into_iter()
            .filter_map(|id| {
                if id == SERF_HEALTH {
                    liveness.clone()
                } else {
                    Some(id)
                }
            })
            .collect();
        // A registry server's own node is in the catalog as a Consul
        // agent's always is: registered with its first session.
        let register_node = node == *app.node_name && state.catalog.node(&node).is_none();
        (node_checks, register_node)
    };
    let id = crate::storage::datadir::new_uuid();
    let spec = SessionSpec {
        id: id.clone(),
        name,
        node,
        node_checks,
        service_checks,
        lock_delay_ns: u64::try_from(lock_delay.as_nanos()).unwrap_or(u64::MAX),
        behavior,
        ttl: if meshwork_core::duration::parse_duration(&ttl) == Some(Duration::ZERO) {
            String::new()
        } else {
            ttl
        },
    };
    let create = Command::SessionCreate(Box::new(spec));
    let command = if register_node {
        Command::Batch(vec![
            Command::CatalogRegister(Box::new(Registration {
                node: app.node_name.to_string(),
                node_id: app.node_uuid.to_string(),
                address: app.agent_address.to_string(),
                datacenter: app.datacenter.to_string(),
                ..Registration::default()
            })),
            create,
        ])
    } else {
        create
    };
    let applied = app.node.write(command).await?;
    let response = match applied.response {
        CommandResponse::Batch(mut responses) => responses.pop().unwrap_or_default(),
        other => other,
    };
    match response {
        CommandResponse::Applied(true) => Ok(axum::Json(json!({ "ID": id })).into_response()),
        CommandResponse::Refused(why) => Err(ApiError::Internal(why)),
        other => Err(ApiError::Internal(format!(
            "Failed to create session: unexpected answer {other:?}"
        ))),
    }
}

/// Longest session name accepted.
const MAX_NAME_BYTES: usize = 1024;
/// Most checks a session may name.
const MAX_CHECKS: usize = 64;

/// Drops repeated entries, keeping the first of each.
fn dedup(list: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|id| seen.insert(id.clone()));
}

/// `LockDelay`: a Go duration string, or a number — of seconds when
/// below 1000 (what clients that write `15` mean), else of nanoseconds —
/// as Consul reads it.
fn lock_delay(f: &mut Fields) -> Result<Duration, ApiError> {
    if !f.has("lockdelay") {
        return Ok(DEFAULT_LOCK_DELAY);
    }
    if f.string_value("lockdelay")
        .is_some_and(|t| !t.is_empty() && !t.ends_with(|c: char| c.is_ascii_alphabetic()))
    {
        return Err(ApiError::bad_request(
            "Request decode failed: LockDelay needs a unit, as \"15s\"",
        ));
    }
    let delay = f.duration("lockdelay")?.unwrap_or(Duration::ZERO);
    if delay < Duration::from_nanos(1000) {
        Ok(Duration::from_secs(u64::from(delay.subsec_nanos())))
    } else {
        Ok(delay)
    }
}

/// `PUT /v1/session/destroy/:id`.
pub async fn destroy(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    require_session_write(&app, &authz, &id)?;
    app.node.write(Command::SessionDestroy { id }).await?;
    Ok(axum::Json(true).into_response())
}

/// `PUT /v1/session/renew/:id`: restarts the session's TTL clock on the
/// leader (no log write); 404 once the session is gone.
pub async fn renew(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    require_session_write(&app, &authz, &id)?;
    if !app.node.renew_session(&id).await? {
        return Err(ApiError::NotFound(format!("Session id '{id}' not found")));
    }
    // As Consul: the session, and no index headers (a renewal is no read).
    // A follower that has not applied the session yet catches up first.
    if app.node.state.read().sessions.get(&id).is_none() {
        app.node.read_barrier(Consistency::Default).await?;
    }
    let (body, _) = sessions_json(&authz, app.node.state.read().sessions.get(&id).into_iter());
    Ok(json_response(body))
}

/// A session's write (its node's `session` rule); an unknown session
/// needs none (destroying it changes nothing, renewing it is a 404).
fn require_session_write(app: &AppState, authz: &Authz, id: &str) -> Result<(), ApiError> {
    let node = app
        .node
        .state
        .read()
        .sessions
        .get(id)
        .map(|s| s.spec.node.clone());
    if let Some(node) = node {
        authz.require(Kind::Session, &node, Need::Write)?;
    }
    Ok(())
}

/// `GET /v1/session/info/:id`.
pub async fn info(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    read(&app, query.as_deref(), &authz, move |state, authz| {
        sessions_json(authz, state.sessions.get(&id).into_iter())
    })
    .await
}

/// `GET /v1/session/node/:node`.
pub async fn node(
    State(app): State<AppState>,
    authz: Authz,
    Path(node): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    read(&app, query.as_deref(), &authz, move |state, authz| {
        sessions_json(authz, state.sessions.of_node(&node))
    })
    .await
}

/// `GET /v1/session/list`.
pub async fn list(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    read(&app, query.as_deref(), &authz, move |state, authz| {
        sessions_json(authz, state.sessions.iter())
    })
    .await
}

/// A (blocking) read of the sessions table.
async fn read(
    app: &AppState,
    query: Option<&str>,
    authz: &Authz,
    compute: impl Fn(&RegistryState, &crate::auth::Resolved) -> (Vec<u8>, bool),
) -> Result<Response, ApiError> {
    let params = Params::parse(query);
    let options = ReadOptions::from_params(&params)?;
    let result = run_read(
        &app.node,
        &app.waiters,
        options,
        &app.shutdown,
        (&IndexOf::Sessions, authz),
        compute,
    )
    .await?;
    let mut headers: HeaderMap = read_headers(&app.node, result.index, options.consistency);
    let (body, filtered) = result.value;
    mark_filtered(&mut headers, filtered);
    let mut response = json_response(body);
    response.headers_mut().extend(headers);
    Ok(response)
}

fn json_response(body: Vec<u8>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::bad_request("Missing session"));
    }
    Ok(())
}

/// A session as Consul's JSON shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    node: &'a str,
    /// Nanoseconds.
    lock_delay: u64,
    behavior: &'static str,
    #[serde(rename = "TTL")]
    ttl: &'a str,
    node_checks: &'a [String],
    /// `null` when there are none, as Consul.
    service_checks: Option<Vec<ServiceCheckJson<'a>>>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceCheckJson<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    namespace: &'static str,
}

impl<'a> SessionJson<'a> {
    pub fn new(session: &'a Session) -> Self {
        let spec = &session.spec;
        SessionJson {
            id: &spec.id,
            name: &spec.name,
            node: &spec.node,
            lock_delay: spec.lock_delay_ns,
            behavior: spec.behavior.as_str(),
            ttl: &spec.ttl,
            node_checks: &spec.node_checks,
            service_checks: (!spec.service_checks.is_empty()).then(|| {
                spec.service_checks
                    .iter()
                    .map(|id| ServiceCheckJson { id, namespace: "" })
                    .collect()
            }),
            create_index: session.create_index,
            modify_index: session.modify_index,
        }
    }
}

/// The sessions the token may read (its node's `session` rule), as
/// Consul's JSON list, and whether any were left out.
fn sessions_json<'a>(
    authz: &crate::auth::Resolved,
    sessions: impl Iterator<Item = &'a Session>,
) -> (Vec<u8>, bool) {
    let mut filtered = false;
    let list: Vec<SessionJson<'_>> = sessions
        .filter(|s| {
            let sees = authz.allows(Kind::Session, &s.spec.node, Need::Read);
            filtered |= !sees;
            sees
        })
        .map(SessionJson::new)
        .collect();
    (
        serde_json::to_vec(&list).unwrap_or_else(|_| b"[]".to_vec()),
        filtered,
    )
}
