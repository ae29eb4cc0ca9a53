//! `/v1/acl/*`: Consul's ACL API — bootstrap, tokens, policies and roles —
//! with Consul's JSON shapes, so `consul acl`, Terraform's provider and
//! the Consul client libraries manage a Meshwork cluster unchanged.
//!
//! Reading the tables needs `acl:read`, changing them `acl:write`; a
//! token's SecretID is shown only to `acl:write` (or to the token itself,
//! through `/v1/acl/token/self`).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::authz::Authz;
use super::consul_json::Fields;
use super::error::ApiError;
use super::query::{Params, ReadOptions, read_headers, run_read};
use super::waiters::IndexOf;
use crate::auth::{Need, Resolved, Single};
use crate::command::{Command, CommandResponse};
use crate::state::State as RegistryState;
use crate::state::acl::{
    ANONYMOUS_ACCESSOR, AclStore, GLOBAL_MANAGEMENT_ID, NodeIdentity, Policy, Role,
    ServiceIdentity, Token,
};
use crate::storage::datadir::new_uuid;
use meshwork_core::timestamp::{format_rfc3339, parse_rfc3339};

/// Shortest and longest token lifetime accepted. Consul's floor is a
/// minute; ours is a second, so that expiry can be shown and tested
/// without waiting.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(86_400);
const MAX_DESCRIPTION_BYTES: usize = 8 * 1024;
const MAX_RULES_BYTES: usize = 128 * 1024;
/// Most policies, roles or identities one token or role may link.
const MAX_LINKS: usize = 256;

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Every ACL endpoint answers this while ACLs are off, as Consul.
fn enabled(app: &AppState) -> Result<(), ApiError> {
    if app.acl.enabled() {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("ACL support disabled".to_owned()))
    }
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn check_description(description: &str) -> Result<(), ApiError> {
    if description.len() > MAX_DESCRIPTION_BYTES {
        return Err(ApiError::bad_request(format!(
            "Description is {} bytes long; the limit is {MAX_DESCRIPTION_BYTES}",
            description.len()
        )));
    }
    Ok(())
}

/// Consul's name rule for policies (1–128) and roles (1–256).
fn check_name(what: &str, name: &str, max: usize) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "Invalid {what} Name: {name:?} must be 1 to {max} letters, digits, '-' or '_'"
        )))
    }
}

/// Consul's rule for service identity names (a DNS-safe lower-case name).
fn check_service_identity(name: &str) -> Result<(), ApiError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 256
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "Service identity {name:?} has an invalid name. Only lowercase alphanumeric \
             characters, '-' and '_' are allowed"
        )))
    }
}

// ---- JSON shapes ----

fn link_json(id: &str, name: &str) -> Value {
    json!({ "ID": id, "Name": name })
}

fn policy_links(acl: &AclStore, ids: &[String]) -> Vec<Value> {
    ids.iter()
        .filter_map(|id| acl.policy(id).map(|p| link_json(id, &p.name)))
        .collect()
}

fn role_links(acl: &AclStore, ids: &[String]) -> Vec<Value> {
    ids.iter()
        .filter_map(|id| acl.role(id).map(|r| link_json(id, &r.name)))
        .collect()
}

fn identities_json(
    services: &[ServiceIdentity],
    nodes: &[NodeIdentity],
    into: &mut serde_json::Map<String, Value>,
) {
    if !services.is_empty() {
        into.insert(
            "ServiceIdentities".into(),
            services
                .iter()
                .map(|s| {
                    let mut v = json!({ "ServiceName": s.service_name });
                    if !s.datacenters.is_empty() {
                        v["Datacenters"] = json!(s.datacenters);
                    }
                    v
                })
                .collect(),
        );
    }
    if !nodes.is_empty() {
        into.insert(
            "NodeIdentities".into(),
            nodes
                .iter()
                .map(|n| json!({ "NodeName": n.node_name, "Datacenter": n.datacenter }))
                .collect(),
        );
    }
}

/// A token as Consul shows it; the secret only to who may see it.
fn token_json(acl: &AclStore, token: &Token, show_secret: bool) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("AccessorID".into(), json!(token.accessor_id));
    map.insert(
        "SecretID".into(),
        json!(if show_secret {
            token.secret_id.as_str()
        } else {
            "<hidden>"
        }),
    );
    map.insert("Description".into(), json!(token.description));
    let policies = policy_links(acl, &token.policies);
    if !policies.is_empty() {
        map.insert("Policies".into(), Value::Array(policies));
    }
    let roles = role_links(acl, &token.roles);
    if !roles.is_empty() {
        map.insert("Roles".into(), Value::Array(roles));
    }
    identities_json(&token.service_identities, &token.node_identities, &mut map);
    map.insert("Local".into(), json!(token.local));
    if let Some(at) = token.expiration_ns {
        map.insert("ExpirationTime".into(), json!(format_rfc3339(at)));
    }
    map.insert(
        "CreateTime".into(),
        json!(format_rfc3339(token.create_time_ns)),
    );
    map.insert("Legacy".into(), json!(false));
    map.insert("CreateIndex".into(), json!(token.create_index));
    map.insert("ModifyIndex".into(), json!(token.modify_index));
    Value::Object(map)
}

fn policy_json(policy: &Policy, with_rules: bool) -> Value {
    let mut v = json!({
        "ID": policy.id,
        "Name": policy.name,
        "Description": policy.description,
        "CreateIndex": policy.create_index,
        "ModifyIndex": policy.modify_index,
    });
    if with_rules {
        v["Rules"] = json!(policy.rules);
    }
    if !policy.datacenters.is_empty() {
        v["Datacenters"] = json!(policy.datacenters);
    }
    v
}

fn role_json(acl: &AclStore, role: &Role) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("ID".into(), json!(role.id));
    map.insert("Name".into(), json!(role.name));
    map.insert("Description".into(), json!(role.description));
    let policies = policy_links(acl, &role.policies);
    if !policies.is_empty() {
        map.insert("Policies".into(), Value::Array(policies));
    }
    identities_json(&role.service_identities, &role.node_identities, &mut map);
    map.insert("CreateIndex".into(), json!(role.create_index));
    map.insert("ModifyIndex".into(), json!(role.modify_index));
    Value::Object(map)
}

// ---- reads ----

/// A (blocking) read of the ACL tables: `compute` gets the token's rights
/// as they are when it runs (after a wait, they may have changed).
async fn read(
    app: &AppState,
    authz: &Authz,
    query: Option<&str>,
    compute: impl Fn(&RegistryState, &Resolved) -> Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let params = Params::parse(query);
    let options = ReadOptions::from_params(&params)?;
    let result = run_read(
        &app.node,
        &app.waiters,
        options,
        &app.shutdown,
        (&IndexOf::Acl, authz),
        compute,
    )
    .await?;
    let value = result.value?;
    let mut response = axum::Json(value).into_response();
    response
        .headers_mut()
        .extend(read_headers(&app.node, result.index, options.consistency));
    Ok(response)
}

/// `GET /v1/acl/token/self`: the request's own token.
pub async fn token_self(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    let accessor = authz.accessor().unwrap_or(ANONYMOUS_ACCESSOR).to_owned();
    // The secret only to who sent it: a request without a token acts as
    // the default token, whose secret it was never given.
    let show = authz.token_given();
    read(&app, &authz, query.as_deref(), move |state, _| {
        let token = state
            .acl
            .token(&accessor)
            .ok_or_else(|| ApiError::Forbidden("ACL not found".into()))?;
        Ok(token_json(&state.acl, &token, show))
    })
    .await
}

/// `GET /v1/acl/token/:accessor`.
pub async fn token_read(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    read(&app, &authz, query.as_deref(), move |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        let show = rights.allows_single(Single::Acl, Need::Write);
        let token = state
            .acl
            .token(&id)
            .ok_or_else(|| ApiError::Forbidden("ACL not found".into()))?;
        Ok(token_json(&state.acl, &token, show))
    })
    .await
}

/// `GET /v1/acl/tokens[?policy=ID][&role=ID]`.
pub async fn token_list(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    let params = Params::parse(query.as_deref());
    let policy = params.get("policy").map(str::to_owned);
    let role = params.get("role").map(str::to_owned);
    read(&app, &authz, query.as_deref(), move |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        let show = rights.allows_single(Single::Acl, Need::Write);
        let list: Vec<Value> = state
            .acl
            .tokens()
            .iter()
            .filter(|t| policy.as_ref().is_none_or(|p| t.policies.contains(p)))
            .filter(|t| role.as_ref().is_none_or(|r| t.roles.contains(r)))
            .map(|t| token_json(&state.acl, t, show))
            .collect();
        Ok(Value::Array(list))
    })
    .await
}

/// `GET /v1/acl/policy/:id`.
pub async fn policy_read(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    read(&app, &authz, query.as_deref(), move |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        let policy = state
            .acl
            .policy(&id)
            .ok_or_else(|| ApiError::Forbidden("ACL policy not found".into()))?;
        Ok(policy_json(&policy, true))
    })
    .await
}

/// `GET /v1/acl/policy/name/:name`.
pub async fn policy_read_by_name(
    State(app): State<AppState>,
    authz: Authz,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    read(&app, &authz, query.as_deref(), move |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        let policy = state
            .acl
            .policy_by_name(&name)
            .ok_or_else(|| ApiError::Forbidden("ACL policy not found".into()))?;
        Ok(policy_json(&policy, true))
    })
    .await
}

/// `GET /v1/acl/policies`: without their rules, as Consul.
pub async fn policy_list(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    read(&app, &authz, query.as_deref(), |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        Ok(Value::Array(
            state
                .acl
                .policies()
                .iter()
                .map(|p| policy_json(p, false))
                .collect(),
        ))
    })
    .await
}

/// `GET /v1/acl/role/:id`.
pub async fn role_read(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    read(&app, &authz, query.as_deref(), move |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        let role = state
            .acl
            .role(&id)
            .ok_or_else(|| ApiError::Forbidden("ACL role not found".into()))?;
        Ok(role_json(&state.acl, role))
    })
    .await
}

/// `GET /v1/acl/role/name/:name`.
pub async fn role_read_by_name(
    State(app): State<AppState>,
    authz: Authz,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    read(&app, &authz, query.as_deref(), move |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        let role = state
            .acl
            .role_by_name(&name)
            .ok_or_else(|| ApiError::Forbidden("ACL role not found".into()))?;
        Ok(role_json(&state.acl, role))
    })
    .await
}

/// `GET /v1/acl/roles`.
pub async fn role_list(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Read)?;
    read(&app, &authz, query.as_deref(), |state, rights| {
        rights.require_single(Single::Acl, Need::Read)?;
        Ok(Value::Array(
            state
                .acl
                .roles()
                .map(|r| role_json(&state.acl, r))
                .collect(),
        ))
    })
    .await
}

// ---- writes ----

/// Writes an ACL command; Consul's refusals are 400s with its message.
async fn write_acl(app: &AppState, command: Command) -> Result<bool, ApiError> {
    let applied = app.node.write(command).await?;
    match applied.response {
        CommandResponse::Applied(done) => Ok(done),
        CommandResponse::Refused(why) => Err(ApiError::bad_request(why)),
        other => Err(ApiError::Internal(format!(
            "unexpected answer to an ACL write: {other:?}"
        ))),
    }
}

/// `PUT /v1/acl/bootstrap`: the first management token, once. A body may
/// name its SecretID (`{"BootstrapSecret": "<uuid>"}`).
pub async fn bootstrap(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    enabled(&app)?;
    let mut f = if body.iter().all(u8::is_ascii_whitespace) {
        Fields::from_value("bootstrap request", Value::Null)?
    } else {
        Fields::from_body("bootstrap request", &body)?
    };
    let secret = f.string("bootstrapsecret")?;
    f.finish()?;
    if !secret.is_empty() && !is_uuid(&secret) {
        return Err(ApiError::bad_request(
            "BootstrapSecret must be a UUID".to_owned(),
        ));
    }
    let token = Token {
        accessor_id: new_uuid(),
        secret_id: if secret.is_empty() {
            new_uuid()
        } else {
            secret
        },
        description: "Bootstrap Token (Global Management)".to_owned(),
        policies: vec![GLOBAL_MANAGEMENT_ID.to_owned()],
        create_time_ns: now_ns(),
        ..Token::default()
    };
    let applied = app
        .node
        .write(Command::AclBootstrap(Box::new(token.clone())))
        .await?;
    match applied.response {
        CommandResponse::Applied(true) => {}
        CommandResponse::Refused(why) => return Err(ApiError::Forbidden(why)),
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected answer to the bootstrap: {other:?}"
            )));
        }
    }
    tracing::info!(accessor = %token.accessor_id, "ACL bootstrap: management token created");
    let state = app.node.state.read();
    let stored = state.acl.token(&token.accessor_id).unwrap_or(token);
    Ok(axum::Json(token_json(&state.acl, &stored, true)).into_response())
}

/// Resolves `[{"ID": …} | {"Name": …}]` links against the tables.
fn links(
    objects: Vec<Fields>,
    what: &str,
    by_id: impl Fn(&str) -> bool,
    by_name: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ApiError> {
    if objects.len() > MAX_LINKS {
        return Err(ApiError::bad_request(format!(
            "At most {MAX_LINKS} {what} links are accepted"
        )));
    }
    let mut ids = Vec::new();
    for mut link in objects {
        let id = link.string("id")?;
        let name = link.string("name")?;
        link.finish()?;
        let id = if !id.is_empty() {
            if !by_id(&id) {
                return Err(ApiError::bad_request(format!("cannot find {what} {id}")));
            }
            id
        } else if !name.is_empty() {
            by_name(&name)
                .ok_or_else(|| ApiError::bad_request(format!("cannot find {what} {name:?}")))?
        } else {
            return Err(ApiError::bad_request(format!(
                "a {what} link needs an ID or a Name"
            )));
        };
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn identities(f: &mut Fields) -> Result<(Vec<ServiceIdentity>, Vec<NodeIdentity>), ApiError> {
    let mut services = Vec::new();
    for mut s in f.objects("serviceidentities", "service identity")? {
        let service_name = s.string("servicename")?;
        let datacenters = s.strings("datacenters")?;
        s.finish()?;
        check_service_identity(&service_name)?;
        services.push(ServiceIdentity {
            service_name,
            datacenters,
        });
    }
    let mut nodes = Vec::new();
    for mut n in f.objects("nodeidentities", "node identity")? {
        let node_name = n.string("nodename")?;
        let datacenter = n.string("datacenter")?;
        n.finish()?;
        if node_name.is_empty() || datacenter.is_empty() {
            return Err(ApiError::bad_request(
                "Node identity is missing the node name or datacenter",
            ));
        }
        nodes.push(NodeIdentity {
            node_name,
            datacenter,
        });
    }
    if services.len() + nodes.len() > MAX_LINKS {
        return Err(ApiError::bad_request(format!(
            "At most {MAX_LINKS} identities are accepted"
        )));
    }
    Ok((services, nodes))
}

/// `PUT /v1/acl/token` (create).
pub async fn token_create(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    write_token(app, authz, None, &body).await
}

/// `PUT /v1/acl/token/:accessor` (update).
pub async fn token_update(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    write_token(app, authz, Some(id), &body).await
}

async fn write_token(
    app: AppState,
    authz: Authz,
    path_id: Option<String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Write)?;
    let mut f = Fields::from_body("token", body)?;
    let accessor = f.string("accessorid")?;
    let secret = f.string("secretid")?;
    let description = f.string("description")?;
    check_description(&description)?;
    let policy_links = f.objects("policies", "policy link")?;
    let role_links = f.objects("roles", "role link")?;
    let (service_identities, node_identities) = identities(&mut f)?;
    let local = f.bool("local")?;
    let expiration_time = f.string("expirationtime")?;
    let expiration_ttl = f.duration("expirationttl")?;
    f.ignore(&[
        "namespace",
        "partition",
        "hash",
        "createindex",
        "modifyindex",
        "createtime",
        "legacy",
    ]);
    f.finish()?;
    for (what, id) in [("AccessorID", &accessor), ("SecretID", &secret)] {
        if !id.is_empty() && !is_uuid(id) {
            return Err(ApiError::bad_request(format!(
                "Invalid Token: {what} must be a UUID"
            )));
        }
    }
    if !expiration_time.is_empty() && expiration_ttl.is_some() {
        return Err(ApiError::bad_request(
            "Expiration TTL and Expiration Time cannot both be set",
        ));
    }
    let now = now_ns();
    let expiration_ns = match (expiration_ttl, expiration_time.as_str()) {
        (Some(ttl), _) => {
            if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
                return Err(ApiError::bad_request(format!(
                    "Token Expiration TTL '{ttl:?}' should be between 1s and 24h"
                )));
            }
            Some(now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX)))
        }
        (None, "") => None,
        (None, text) => {
            let at = parse_rfc3339(text).ok_or_else(|| {
                ApiError::bad_request(format!("ExpirationTime {text:?} is not an RFC 3339 time"))
            })?;
            if at <= now {
                return Err(ApiError::bad_request(
                    "ExpirationTime cannot be in the past",
                ));
            }
            Some(at)
        }
    };
    let token = {
        let state = app.node.state.read();
        let acl = &state.acl;
        let policies = links(
            policy_links,
            "policy",
            |id| acl.policy(id).is_some(),
            |name| acl.policy_by_name(name).map(|p| p.id),
        )?;
        let roles = links(
            role_links,
            "role",
            |id| acl.role(id).is_some(),
            |name| acl.role_by_name(name).map(|r| r.id.clone()),
        )?;
        match &path_id {
            None => {
                if accessor == ANONYMOUS_ACCESSOR || acl.token(&accessor).is_some() {
                    return Err(ApiError::bad_request(
                        "Invalid Token: AccessorID already in use",
                    ));
                }
                Token {
                    accessor_id: if accessor.is_empty() {
                        new_uuid()
                    } else {
                        accessor
                    },
                    secret_id: if secret.is_empty() {
                        new_uuid()
                    } else {
                        secret
                    },
                    description,
                    policies,
                    roles,
                    service_identities,
                    node_identities,
                    local,
                    create_time_ns: now,
                    expiration_ns,
                    ..Token::default()
                }
            }
            Some(id) => {
                if !accessor.is_empty() && accessor != *id {
                    return Err(ApiError::bad_request(
                        "Token AccessorID in URL and payload do not match",
                    ));
                }
                let old = acl
                    .token(id)
                    .ok_or_else(|| ApiError::NotFound(format!("Cannot find token {id:?}")))?;
                if !secret.is_empty() && secret != old.secret_id {
                    return Err(ApiError::bad_request("Cannot change a token's SecretID"));
                }
                if local != old.local {
                    return Err(ApiError::bad_request(
                        "Cannot toggle local mode of an existing token",
                    ));
                }
                if expiration_ns.is_some() && expiration_ns != old.expiration_ns {
                    return Err(ApiError::bad_request(
                        "Cannot change expiration time of an existing token",
                    ));
                }
                Token {
                    description,
                    policies,
                    roles,
                    service_identities,
                    node_identities,
                    ..old
                }
            }
        }
    };
    write_acl(&app, Command::AclTokenSet(Box::new(token.clone()))).await?;
    let state = app.node.state.read();
    let stored = state.acl.token(&token.accessor_id).unwrap_or(token);
    Ok(axum::Json(token_json(&state.acl, &stored, true)).into_response())
}

/// `PUT /v1/acl/token/:accessor/clone`: a new token with the same links.
pub async fn token_clone(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Write)?;
    let description = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let mut f = Fields::from_body("token clone request", &body)?;
        let d = f
            .has("description")
            .then(|| f.string("description"))
            .transpose()?;
        f.ignore(&["namespace", "partition"]);
        f.finish()?;
        d
    };
    let token = {
        let state = app.node.state.read();
        let old = state
            .acl
            .token(&id)
            .ok_or_else(|| ApiError::NotFound(format!("Cannot find token {id:?}")))?;
        if old.accessor_id == ANONYMOUS_ACCESSOR {
            return Err(ApiError::bad_request("Cannot clone the anonymous token"));
        }
        let description = description.unwrap_or(old.description);
        check_description(&description)?;
        Token {
            accessor_id: new_uuid(),
            secret_id: new_uuid(),
            description,
            create_time_ns: now_ns(),
            create_index: 0,
            modify_index: 0,
            ..old
        }
    };
    write_acl(&app, Command::AclTokenSet(Box::new(token.clone()))).await?;
    let state = app.node.state.read();
    let stored = state.acl.token(&token.accessor_id).unwrap_or(token);
    Ok(axum::Json(token_json(&state.acl, &stored, true)).into_response())
}

/// `DELETE /v1/acl/token/:accessor`.
pub async fn token_delete(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Write)?;
    let deleted = write_acl(&app, Command::AclTokenDelete { accessor_id: id }).await?;
    Ok(axum::Json(deleted).into_response())
}

/// The id a policy or role write is for: a new one on create (an id in
/// the body is refused, as Consul), the URL's on update (the body's, if
/// given, must match; the object must exist).
fn object_id(
    path_id: Option<&str>,
    body_id: String,
    what: &str,
    exists: impl Fn(&str) -> bool,
) -> Result<String, ApiError> {
    let Some(path) = path_id else {
        if !body_id.is_empty() {
            return Err(ApiError::bad_request(format!(
                "Cannot specify the ID when creating a new {what}"
            )));
        }
        return Ok(new_uuid());
    };
    if !body_id.is_empty() && body_id != path {
        let mut title = what.to_owned();
        title[..1].make_ascii_uppercase();
        return Err(ApiError::bad_request(format!(
            "{title} ID in URL and payload do not match"
        )));
    }
    if !exists(path) {
        return Err(ApiError::NotFound(format!("Cannot find {what} {path:?}")));
    }
    Ok(path.to_owned())
}

/// `PUT /v1/acl/policy` (create).
pub async fn policy_create(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    write_policy(app, authz, None, &body).await
}

/// `PUT /v1/acl/policy/:id` (update).
pub async fn policy_update(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    write_policy(app, authz, Some(id), &body).await
}

async fn write_policy(
    app: AppState,
    authz: Authz,
    path_id: Option<String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Write)?;
    let mut f = Fields::from_body("policy", body)?;
    let id = f.string("id")?;
    let name = f.string("name")?;
    let description = f.string("description")?;
    let rules = f.string("rules")?;
    let datacenters = f.strings("datacenters")?;
    f.ignore(&[
        "namespace",
        "partition",
        "hash",
        "createindex",
        "modifyindex",
    ]);
    f.finish()?;
    check_name("Policy", &name, 128)?;
    check_description(&description)?;
    if rules.len() > MAX_RULES_BYTES {
        return Err(ApiError::bad_request(format!(
            "Rules are {} bytes long; the limit is {MAX_RULES_BYTES}",
            rules.len()
        )));
    }
    crate::auth::rules::parse(&rules).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let policy = {
        let state = app.node.state.read();
        let id = object_id(path_id.as_deref(), id, "policy", |id| {
            state.acl.policy(id).is_some()
        })?;
        Policy {
            id,
            name,
            description,
            rules,
            datacenters,
            ..Policy::default()
        }
    };
    write_acl(&app, Command::AclPolicySet(Box::new(policy.clone()))).await?;
    let state = app.node.state.read();
    let stored = state.acl.policy(&policy.id).unwrap_or(policy);
    Ok(axum::Json(policy_json(&stored, true)).into_response())
}

/// `DELETE /v1/acl/policy/:id`.
pub async fn policy_delete(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Write)?;
    let deleted = write_acl(&app, Command::AclPolicyDelete { id }).await?;
    Ok(axum::Json(deleted).into_response())
}

/// `PUT /v1/acl/role` (create).
pub async fn role_create(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    write_role(app, authz, None, &body).await
}

/// `PUT /v1/acl/role/:id` (update).
pub async fn role_update(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    write_role(app, authz, Some(id), &body).await
}

async fn write_role(
    app: AppState,
    authz: Authz,
    path_id: Option<String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Write)?;
    let mut f = Fields::from_body("role", body)?;
    let id = f.string("id")?;
    let name = f.string("name")?;
    let description = f.string("description")?;
    let policy_links = f.objects("policies", "policy link")?;
    let (service_identities, node_identities) = identities(&mut f)?;
    f.ignore(&[
        "namespace",
        "partition",
        "hash",
        "createindex",
        "modifyindex",
    ]);
    f.finish()?;
    check_name("Role", &name, 256)?;
    check_description(&description)?;
    let role = {
        let state = app.node.state.read();
        let acl = &state.acl;
        let policies = links(
            policy_links,
            "policy",
            |id| acl.policy(id).is_some(),
            |name| acl.policy_by_name(name).map(|p| p.id),
        )?;
        let id = object_id(path_id.as_deref(), id, "role", |id| acl.role(id).is_some())?;
        Role {
            id,
            name,
            description,
            policies,
            service_identities,
            node_identities,
            ..Role::default()
        }
    };
    write_acl(&app, Command::AclRoleSet(Box::new(role.clone()))).await?;
    let state = app.node.state.read();
    let stored = state.acl.role(&role.id).cloned().unwrap_or(role);
    Ok(axum::Json(role_json(&state.acl, &stored)).into_response())
}

/// `DELETE /v1/acl/role/:id`.
pub async fn role_delete(
    State(app): State<AppState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    enabled(&app)?;
    authz.require_single(Single::Acl, Need::Write)?;
    let deleted = write_acl(&app, Command::AclRoleDelete { id }).await?;
    Ok(axum::Json(deleted).into_response())
}
