//! `PUT /v1/txn`: Consul's transactions — up to 128 operations applied all
//! or none in one log entry. A transaction that only reads is answered
//! from the state (after the read's consistency barrier) without a write.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::AppState;
use super::authz::Authz;
use super::consul_json::{self, Fields};
use super::error::ApiError;
use super::kv::{KvPair, MAX_KEY_BYTES, MAX_VALUE_BYTES, read_body};
use super::query::{Params, ReadOptions, read_headers};
use crate::auth::{Kind, Need};
use crate::command::{Command, CommandResponse};
use crate::state::catalog::{Registration, ServiceSpec};
use crate::state::txn::{
    self, CatalogVerb, CheckOp, KvOp, KvVerb, MAX_OPS, NodeOp, ServiceOp, TxnError, TxnOp,
    TxnOutcome, TxnResult,
};

/// Largest transaction body (Consul's `txn_max_req_len` default).
pub const MAX_TXN_BYTES: usize = 512 * 1024;

/// `PUT /v1/txn`.
pub async fn handle(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let body = read_body(&headers, body, MAX_TXN_BYTES).await?;
    drop(headers);
    let decoded = decode(&body, &app.datacenter)?;
    // An operation the token may not do fails the transaction as Consul's
    // do: a 409 naming it, nothing applied.
    let errors: Vec<TxnError> = {
        let state = app.node.state.read();
        decoded
            .iter()
            .enumerate()
            .filter_map(|(op_index, op)| {
                let what = match op {
                    Err(what) => what.clone(),
                    Ok(op) => permitted(&authz, &state, op).err()?.to_string(),
                };
                Some(TxnError { op_index, what })
            })
            .collect()
    };
    if !errors.is_empty() {
        let outcome = TxnOutcome {
            results: Vec::new(),
            errors,
        };
        return Ok(answer(&outcome).into_response());
    }
    let ops: Vec<TxnOp> = decoded.into_iter().filter_map(Result::ok).collect();
    if ops.iter().all(TxnOp::reads_only) {
        let options = ReadOptions::from_params(&params)?;
        app.node.read_barrier(options.consistency).await?;
        let (mut outcome, index) = {
            let mut state = app.node.state.read().clone();
            let index = state.last_index;
            (txn::run(&mut state, index, &ops), index)
        };
        hide_unreadable(&authz, &mut outcome);
        let headers = read_headers(&app.node, index.max(1), options.consistency);
        return Ok((headers, answer(&outcome)).into_response());
    }
    let applied = app.node.write(Command::Txn(ops)).await?;
    match applied.response {
        CommandResponse::Txn(mut outcome) => {
            hide_unreadable(&authz, &mut outcome);
            let mut response = answer(&outcome).into_response();
            response.headers_mut().insert(
                "X-Consul-Index",
                axum::http::HeaderValue::from(applied.index),
            );
            Ok(response)
        }
        other => Err(ApiError::Internal(format!(
            "unexpected answer to a transaction: {other:?}"
        ))),
    }
}

/// Whether the token may do `op` (Consul's per-operation vetting): KV
/// reads need `key:read`, writes `key:write` (a tree delete, on every key
/// under it); catalog operations the node's or service's permission.
fn permitted(
    authz: &crate::auth::Resolved,
    state: &crate::state::State,
    op: &TxnOp,
) -> Result<(), crate::auth::Refusal> {
    use crate::state::txn::KvVerb;
    let need = |reads: bool| if reads { Need::Read } else { Need::Write };
    match op {
        TxnOp::Kv(kv) => match kv.verb {
            // Filtered afterwards, as Consul's lists.
            KvVerb::GetTree => Ok(()),
            KvVerb::DeleteTree => authz.require_prefix(Kind::Key, &kv.key, Need::Write),
            verb => authz.require(Kind::Key, &kv.key, need(verb.reads_only())),
        },
        TxnOp::Node(n) => {
            let reads = n.verb == CatalogVerb::Get;
            authz.require(Kind::Node, &n.node.node, need(reads))
        }
        // The stored instance decides (a delete names only its ID); a set
        // that renames an instance needs both names' write.
        TxnOp::Service(s) => {
            let reads = s.verb == CatalogVerb::Get;
            let stored = state.catalog.service(&s.node, &s.service.id);
            if reads {
                authz.require(Kind::Node, &s.node, Need::Read)?;
            }
            if let Some(old) = stored {
                authz.require(Kind::Service, &old.name, need(reads))?;
            }
            let writes_name = matches!(s.verb, CatalogVerb::Set | CatalogVerb::Cas);
            if writes_name || stored.is_none() {
                authz.require(Kind::Service, &s.service.name, need(reads))?;
            }
            Ok(())
        }
        // A check belongs to its service, or to its node: both the stored
        // check's owner and (for a set) the new one must be allowed.
        TxnOp::Check(c) => {
            let reads = c.verb == CatalogVerb::Get;
            let owner_of = |service_id: &str| {
                (!service_id.is_empty())
                    .then(|| {
                        state
                            .catalog
                            .service(&c.node, service_id)
                            .map(|s| s.name.clone())
                    })
                    .flatten()
            };
            let stored = state
                .catalog
                .node_checks(&c.node)
                .find(|k| k.check_id == c.check.check_id)
                .map(|k| owner_of(&k.service_id));
            let requested = owner_of(&c.check.service_id);
            if reads {
                authz.require(Kind::Node, &c.node, Need::Read)?;
            }
            let owners = match (stored, c.verb) {
                (Some(old), CatalogVerb::Set | CatalogVerb::Cas) => vec![old, requested],
                (Some(old), _) => vec![old],
                (None, _) => vec![requested],
            };
            for owner in owners {
                match owner {
                    Some(name) => authz.require(Kind::Service, &name, need(reads))?,
                    None => authz.require(Kind::Node, &c.node, need(reads))?,
                }
            }
            Ok(())
        }
    }
}

/// Drops KV results the token may not read (a `get-tree`'s).
fn hide_unreadable(authz: &crate::auth::Resolved, outcome: &mut TxnOutcome) {
    outcome.results.retain(|r| match r {
        TxnResult::Kv { key, .. } => authz.allows(Kind::Key, key, Need::Read),
        _ => true,
    });
}

/// The answer: 200 with `Results`, or 409 with `Errors` (Consul's shape).
fn answer(outcome: &TxnOutcome) -> (StatusCode, axum::Json<Value>) {
    if !outcome.errors.is_empty() {
        let errors: Vec<Value> = outcome
            .errors
            .iter()
            .map(|e| json!({ "OpIndex": e.op_index, "What": e.what }))
            .collect();
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({ "Results": null, "Errors": errors })),
        );
    }
    let results: Vec<Value> = outcome
        .results
        .iter()
        .map(|result| match result {
            TxnResult::Kv {
                key,
                entry,
                with_value,
            } => {
                let mut pair = serde_json::to_value(KvPair::new(key, entry)).unwrap_or(Value::Null);
                if !with_value && let Value::Object(map) = &mut pair {
                    map.insert("Value".into(), Value::Null);
                }
                json!({ "KV": pair })
            }
            TxnResult::Node(node) => json!({ "Node": consul_json::node_json(node) }),
            TxnResult::Service(service) => {
                json!({ "Service": consul_json::service_json(service) })
            }
            TxnResult::Check(check) => json!({ "Check": consul_json::check_json(check) }),
        })
        .collect();
    (
        StatusCode::OK,
        axum::Json(json!({ "Results": results, "Errors": null })),
    )
}

/// Decodes the operations. A body that is not a list of operations, or an
/// operation with an unknown field or a wrong type, is a 400 (`Failed to
/// parse body`); an operation that parses but makes no sense (an unknown
/// verb, no key) is reported, with every other such one, as Consul's 409.
fn decode(body: &[u8], datacenter: &str) -> Result<Vec<Result<TxnOp, String>>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Failed to parse body: {e}")))?;
    let items = match value {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        _ => {
            return Err(ApiError::bad_request(
                "Failed to parse body: a transaction is a JSON list of operations",
            ));
        }
    };
    if items.len() > MAX_OPS {
        return Err(ApiError::PayloadTooLarge(format!(
            "Transaction contains too many operations ({} > {MAX_OPS})",
            items.len()
        )));
    }
    items
        .into_iter()
        .map(|item| decode_op(item, datacenter))
        .collect()
}

fn decode_op(item: Value, datacenter: &str) -> Result<Result<TxnOp, String>, ApiError> {
    let mut op = Fields::from_value("operation", item)
        .map_err(|e| ApiError::bad_request(format!("Failed to parse body: {e}")))?;
    let kv = op.object("kv", "KV")?;
    let node = op.object("node", "Node operation")?;
    let service = op.object("service", "Service operation")?;
    let check = op.object("check", "Check operation")?;
    op.finish()
        .map_err(|e| ApiError::bad_request(format!("Failed to parse body: {e}")))?;
    match (kv, node, service, check) {
        (Some(kv), None, None, None) => decode_kv(kv),
        (None, Some(node), None, None) => decode_node(node, datacenter),
        (None, None, Some(service), None) => decode_service(service),
        (None, None, None, Some(check)) => decode_check(check),
        (None, None, None, None) => Ok(Err("no operation specified".into())),
        _ => Err(ApiError::bad_request(
            "Failed to parse body: an operation has exactly one of KV, Node, Service or Check",
        )),
    }
}

/// The verb of a Node, Service or Check operation (Consul's message for
/// an unknown one is a 409).
fn catalog_verb(f: &mut Fields, kind: &str) -> Result<Result<CatalogVerb, String>, ApiError> {
    let text = f.string("verb")?;
    Ok(CatalogVerb::parse(&text).ok_or_else(|| format!("unknown {kind} verb {text:?}")))
}

fn parse_failed(e: ApiError) -> ApiError {
    ApiError::bad_request(format!("Failed to parse body: {e}"))
}

fn decode_node(mut f: Fields, datacenter: &str) -> Result<Result<TxnOp, String>, ApiError> {
    let verb = catalog_verb(&mut f, "Node")?;
    let mut n = f
        .object("node", "Node")?
        .unwrap_or(Fields::from_value("Node", Value::Null)?);
    f.finish().map_err(parse_failed)?;
    let name = n.string("node")?;
    consul_json::printable("node name", &name)?;
    let index = n.u64("modifyindex")?;
    let node = Registration {
        node_id: n.string("id")?,
        address: n.string("address")?,
        datacenter: datacenter.to_owned(),
        tagged_addresses: n.string_map("taggedaddresses")?,
        node_meta: n.string_map("meta")?,
        node: name,
        ..Registration::default()
    };
    let given_dc = n.string("datacenter")?;
    n.ignore(&["createindex", "partition", "peername", "locality"]);
    n.finish().map_err(parse_failed)?;
    let verb = match verb {
        Ok(verb) => verb,
        Err(e) => return Ok(Err(e)),
    };
    if !given_dc.is_empty() && given_dc != datacenter {
        return Ok(Err(format!("No path to datacenter {given_dc:?}")));
    }
    if node.node.is_empty() {
        return Ok(Err("Must provide node".into()));
    }
    if node.address.is_empty() && matches!(verb, CatalogVerb::Set | CatalogVerb::Cas) {
        return Ok(Err("Must provide address".into()));
    }
    Ok(Ok(TxnOp::Node(NodeOp { verb, node, index })))
}

fn decode_service(mut f: Fields) -> Result<Result<TxnOp, String>, ApiError> {
    let verb = catalog_verb(&mut f, "Service")?;
    let node = f.string("node")?;
    let mut s = f
        .object("service", "Service")?
        .unwrap_or(Fields::from_value("Service", Value::Null)?);
    f.ignore(&["namespace", "partition"]);
    f.finish().map_err(parse_failed)?;
    let index = s.u64("modifyindex")?;
    s.ignore(&["createindex"]);
    let verb = match verb {
        Ok(verb) => verb,
        Err(e) => return Ok(Err(e)),
    };
    // A get or delete names the service by ID only.
    let service = if matches!(verb, CatalogVerb::Set | CatalogVerb::Cas) {
        let spec = consul_json::decode_service_fields(&mut s, false)?;
        s.finish().map_err(parse_failed)?;
        spec
    } else {
        let id = s.string("id")?;
        ServiceSpec {
            id,
            ..ServiceSpec::default()
        }
    };
    if node.is_empty() {
        return Ok(Err("Must provide node".into()));
    }
    if service.id.is_empty() {
        return Ok(Err("Must provide service ID".into()));
    }
    Ok(Ok(TxnOp::Service(ServiceOp {
        verb,
        node,
        service,
        index,
    })))
}

fn decode_check(mut f: Fields) -> Result<Result<TxnOp, String>, ApiError> {
    let verb = catalog_verb(&mut f, "Check")?;
    let mut c = f
        .object("check", "Check")?
        .unwrap_or(Fields::from_value("Check", Value::Null)?);
    f.finish().map_err(parse_failed)?;
    let node = c.string("node")?;
    let index = c.u64("modifyindex")?;
    // Consul's check in a transaction carries its probe under
    // `Definition`; read it as the agent's flat check body.
    if let Some(definition) = c.object("definition", "Check Definition")? {
        c.absorb(definition);
    }
    c.ignore(&[
        "createindex",
        "servicename",
        "servicetags",
        "type",
        "exposedport",
        "intervalduration",
        "timeoutduration",
        "deregistercriticalserviceafterduration",
    ]);
    let check = consul_json::decode_check(c)?;
    let verb = match verb {
        Ok(verb) => verb,
        Err(e) => return Ok(Err(e)),
    };
    if node.is_empty() {
        return Ok(Err("Must provide node".into()));
    }
    if check.check_id.is_empty() {
        return Ok(Err("Must provide check ID".into()));
    }
    Ok(Ok(TxnOp::Check(CheckOp {
        verb,
        node,
        check,
        index,
    })))
}

fn decode_kv(mut f: Fields) -> Result<Result<TxnOp, String>, ApiError> {
    let verb_text = f.string("verb")?;
    let key = f.string("key")?;
    let value = match f.string("value")? {
        text if text.is_empty() => Vec::new(),
        text => STANDARD.decode(text.as_bytes()).map_err(|_| {
            ApiError::bad_request(format!(
                "Failed to parse body: the Value of key {key:?} is not base64"
            ))
        })?,
    };
    if value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "Value for key {key:?} is too large ({} > {MAX_VALUE_BYTES} bytes)",
            value.len()
        )));
    }
    let flags = f.u64("flags")?;
    let index = f.u64("index")?;
    let session = f.string("session")?;
    f.ignore(&["namespace", "partition"]);
    f.finish()
        .map_err(|e| ApiError::bad_request(format!("Failed to parse body: {e}")))?;
    let Some(verb) = KvVerb::parse(&verb_text) else {
        return Ok(Err(format!("unknown KV verb {verb_text:?}")));
    };
    if key.is_empty() && verb != KvVerb::DeleteTree && verb != KvVerb::GetTree {
        return Ok(Err("Must provide key".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Ok(Err(format!(
            "Invalid key: {} bytes long, the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(Ok(TxnOp::Kv(KvOp {
        verb,
        key,
        value,
        flags,
        index,
        session,
    })))
}
