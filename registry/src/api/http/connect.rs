//! The mesh CA in Consul's shapes: `GET /v1/connect/ca/roots` (and the
//! agent's copy), `GET|PUT /v1/connect/ca/configuration` and
//! `GET /v1/agent/connect/ca/leaf/:service`.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use super::authz::Authz;
use super::error::ApiError;
use super::waiters::IndexOf;
use crate::auth::{Kind, Need, Single};
use crate::command::{Command, CommandResponse};
use crate::connect::sign::{LeafRequest, SignError};
use crate::connect::{CaError, Leaf};
use crate::state::ca::{CaConfig, CaRoot, CaStore};

/// Seconds as Go prints a `time.Duration` of whole seconds ("72h0m0s").
fn go_duration_secs(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn rfc3339(unix: i64) -> String {
    meshwork_core::timestamp::format_rfc3339(
        u64::try_from(unix)
            .unwrap_or(0)
            .saturating_mul(1_000_000_000),
    )
}

fn root_json(root: &CaRoot) -> Value {
    // Consul shows a root's serial as a number; ours are up to 64 bits
    // for generated roots (longer ones, from an operator, as hex).
    let hex: String = root.serial.chars().filter(|c| *c != ':').collect();
    let serial = u64::from_str_radix(&hex, 16).map_or_else(|_| json!(root.serial), |n| json!(n));
    json!({
        "ID": root.id,
        "Name": root.name,
        "SerialNumber": serial,
        "SigningKeyID": root.id,
        "ExternalTrustDomain": "",
        "NotBefore": rfc3339(root.not_before_unix),
        "NotAfter": rfc3339(root.not_after_unix),
        "RootCert": root.root_cert_pem,
        "IntermediateCerts": if root.intermediate_cert_pems.is_empty() {
            Value::Null
        } else {
            json!(root.intermediate_cert_pems)
        },
        "Active": root.active,
        "PrivateKeyType": "ec",
        "PrivateKeyBits": 256,
        "CreateIndex": root.create_index,
        "ModifyIndex": root.modify_index,
    })
}

/// `GET /v1/connect/ca/roots` and `GET /v1/agent/connect/ca/roots`
/// (blocking-capable; no ACL needed, as Consul: roots are public).
pub async fn roots(
    State(app): State<AppState>,
    authz: Authz,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    super::catalog::json_read(&app, &authz, uri, query, IndexOf::CaRoots, |state, _, _| {
        let trust_domain = state
            .cluster_id
            .as_deref()
            .filter(|_| state.ca.active().is_some())
            .map(crate::connect::trust_domain)
            .unwrap_or_default();
        let value = json!({
            "ActiveRootID": state.ca.active().map(|r| r.id.clone()).unwrap_or_default(),
            "TrustDomain": trust_domain,
            "Roots": state.ca.roots.iter().map(root_json).collect::<Vec<_>>(),
        });
        (value, false)
    })
    .await
}

fn config_json(ca: &CaStore) -> Value {
    json!({
        "Provider": "consul",
        "ClusterID": "",
        "Config": {
            "LeafCertTTL": go_duration_secs(ca.config.leaf_cert_ttl_secs),
            "RootCertTTL": go_duration_secs(ca.config.root_cert_ttl_secs),
            "PrivateKeyType": "ec",
            "PrivateKeyBits": 256,
        },
        "State": Value::Null,
        "ForceWithoutCrossSigning": false,
        "CreateIndex": ca.config.create_index,
        "ModifyIndex": ca.config.modify_index,
    })
}

/// `GET /v1/connect/ca/configuration` (operator:read).
pub async fn configuration(
    State(app): State<AppState>,
    authz: Authz,
) -> Result<Response, ApiError> {
    authz.require_single(Single::Operator, Need::Read)?;
    let state = app.node.state.read();
    let mut value = config_json(&state.ca);
    if let Some(cluster_id) = &state.cluster_id {
        value["ClusterID"] = json!(cluster_id);
    }
    let index = state.ca.index;
    drop(state);
    let mut response = axum::Json(value).into_response();
    response
        .headers_mut()
        .insert("X-Consul-Index", HeaderValue::from(index));
    Ok(response)
}

/// A field of `Config`, its name matched as Consul's decoder does (case
/// and `_` ignored).
fn field<'a>(config: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let fold = |s: &str| {
        s.chars()
            .filter(|c| *c != '_')
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let want = fold(name);
    config.iter().find(|(k, _)| fold(k) == want).map(|(_, v)| v)
}

fn duration_field(config: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    let Some(value) = field(config, name) else {
        return Ok(None);
    };
    let text = value.as_str().ok_or_else(|| {
        ApiError::bad_request(format!("Config.{name}: want a duration such as \"72h\""))
    })?;
    let duration = meshwork_core::duration::parse_duration(text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "Config.{name}: {text:?} is not a duration such as \"72h\""
        ))
    })?;
    Ok(Some(duration.as_secs()))
}

/// `PUT /v1/connect/ca/configuration` (operator:write): Consul's body
/// (`Provider` "consul", `Config`, `ForceWithoutCrossSigning`). With
/// `Config.PrivateKey` and `Config.RootCert` the CA rotates to that root,
/// cross-signed by the current one (when its subject cannot be copied
/// exactly, `ForceWithoutCrossSigning` must say rotating without is
/// meant); with `Config.RotateRoot` = true (a Meshwork extension)
/// it rotates to a new generated root cross-signed by the current one;
/// otherwise only `LeafCertTTL` / `RootCertTTL` change.
pub async fn set_configuration(
    State(app): State<AppState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, ApiError> {
    authz.require_single(Single::Operator, Need::Write)?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Request decode failed: {e}")))?;
    let Value::Object(body) = body else {
        return Err(ApiError::bad_request(
            "Request decode failed: want a JSON object",
        ));
    };
    let mut config = Map::new();
    let mut force = false;
    for (key, value) in &body {
        match key.to_ascii_lowercase().replace('_', "").as_str() {
            "provider" => match value.as_str() {
                Some("consul" | "") => {}
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "Provider {value}: only the built-in \"consul\" provider is supported"
                    )));
                }
            },
            "config" => {
                config = value
                    .as_object()
                    .cloned()
                    .ok_or_else(|| ApiError::bad_request("Config: want a JSON object"))?;
            }
            "forcewithoutcrosssigning" => {
                force = value.as_bool().ok_or_else(|| {
                    ApiError::bad_request("ForceWithoutCrossSigning: want true or false")
                })?;
            }
            "clusterid" | "state" | "createindex" | "modifyindex" => {}
            _ => return Err(ApiError::bad_request(format!("unknown field {key:?}"))),
        }
    }
    const KNOWN: &[&str] = &[
        "LeafCertTTL",
        "RootCertTTL",
        "PrivateKey",
        "RootCert",
        "RotateRoot",
        "PrivateKeyType",
        "PrivateKeyBits",
        "IntermediateCertTTL",
        "RotationPeriod",
        "CSRMaxPerSecond",
        "CSRMaxConcurrent",
    ];
    let fold = |s: &str| s.to_ascii_lowercase().replace('_', "");
    if let Some(key) = config
        .keys()
        .find(|key| !KNOWN.iter().any(|k| fold(k) == fold(key)))
    {
        return Err(ApiError::bad_request(format!(
            "Config: unknown field {key:?} (known: {})",
            KNOWN.join(", ")
        )));
    }
    if let Some(kind) = field(&config, "PrivateKeyType").and_then(Value::as_str)
        && kind != "ec"
    {
        return Err(ApiError::bad_request(format!(
            "Config.PrivateKeyType {kind:?}: only \"ec\" (P-256) is supported"
        )));
    }
    let (ca, cluster_id) = {
        let state = app.node.state.read();
        (state.ca.clone(), state.cluster_id.clone())
    };
    let Some(cluster_id) = cluster_id else {
        return Err(ApiError::Internal(CaError::NotReady.to_string()));
    };
    let Some(active) = ca.active() else {
        return Err(ApiError::Internal(CaError::NotReady.to_string()));
    };
    let mut new_config = CaConfig {
        leaf_cert_ttl_secs: ca.config.leaf_cert_ttl_secs,
        root_cert_ttl_secs: ca.config.root_cert_ttl_secs,
        ..CaConfig::default()
    };
    if let Some(ttl) = duration_field(&config, "LeafCertTTL")? {
        if ttl < crate::config::MIN_LEAF_TTL.as_secs() {
            return Err(ApiError::bad_request(format!(
                "Config.LeafCertTTL: at least {}s",
                crate::config::MIN_LEAF_TTL.as_secs()
            )));
        }
        new_config.leaf_cert_ttl_secs = ttl;
    }
    if let Some(ttl) = duration_field(&config, "RootCertTTL")? {
        if ttl < new_config.leaf_cert_ttl_secs {
            return Err(ApiError::bad_request(
                "Config.RootCertTTL: shorter than LeafCertTTL",
            ));
        }
        new_config.root_cert_ttl_secs = ttl;
    }
    let text = |name: &str| {
        field(&config, name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let rotate = field(&config, "RotateRoot")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let now = crate::connect::now_unix();
    let root = match (text("PrivateKey"), text("RootCert")) {
        (Some(key), Some(cert)) => {
            let mut root = crate::connect::import_root(cert, key, now)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if root.id == active.id {
                None
            } else {
                match crate::connect::cross_sign_imported(&mut root, active) {
                    Ok(()) => Some(root),
                    Err(why) if force => {
                        tracing::warn!(reason = %why, "operator root not cross-signed (forced)");
                        Some(root)
                    }
                    Err(why) => {
                        return Err(ApiError::bad_request(format!(
                            "Config.RootCert cannot be cross-signed by the current root: {why}; \
                             peers that have not yet seen it would refuse its leaves for a moment. \
                             Set ForceWithoutCrossSigning to true if that is meant"
                        )));
                    }
                }
            }
        }
        (None, None) if rotate => Some(
            crate::connect::generate_root(
                &crate::connect::trust_domain(&cluster_id),
                new_config.root_cert_ttl_secs,
                now,
                Some(active),
            )
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        ),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "Config: PrivateKey and RootCert go together",
            ));
        }
    };
    let command = match root {
        Some(root) => {
            tracing::info!(from = %active.id, to = %root.id, "mesh CA root rotation");
            Command::CaRotate {
                expect_active: Some(active.id.clone()),
                root: Box::new(root),
                config: Some(new_config),
                now_unix: now,
            }
        }
        None => Command::CaSetConfig(new_config),
    };
    let applied = app.node.write(command).await?;
    if applied.response != CommandResponse::Applied(true) {
        return Err(ApiError::Conflict(
            "the CA's active root changed while this request was handled; read the configuration and try again"
                .into(),
        ));
    }
    Ok(axum::Json(Value::Null).into_response())
}

/// Leaves made by this server for `/v1/agent/connect/ca/leaf`, by
/// service: the same leaf is answered until 60 % of its life has passed
/// or the active root changed (as Consul's agent cache).
#[derive(Debug, Default)]
pub struct LeafCache(Mutex<HashMap<String, Leaf>>);

/// `GET /v1/agent/connect/ca/leaf/:service` (service:write): a leaf and
/// its private key, made on this server (for clients that do not make
/// their own key; sidecars send a CSR over gRPC instead).
pub async fn leaf(
    State(app): State<AppState>,
    authz: Authz,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    crate::connect::valid_service_name(&service).map_err(ApiError::bad_request)?;
    // A GET that signs (or hands out a kept leaf with its key): the token
    // as of the leader's state, as for writes.
    crate::api::catch_up_for_write(&app.acl, &app.node).await?;
    authz
        .refresh()?
        .require(Kind::Service, &service, Need::Write)?;
    let state = app.node.state.read().clone();
    let now = crate::connect::now_unix();
    let active = state.ca.active().map(|r| r.id.clone());
    let cached = {
        let cache = app.leaves.0.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&service).cloned().filter(|leaf| {
            let life = leaf.valid_before_unix - leaf.valid_after_unix;
            Some(&leaf.root_id) == active.as_ref() && now < leaf.valid_after_unix + life * 6 / 10
        })
    };
    let leaf = match cached {
        Some(leaf) => leaf,
        None => {
            let (key, csr) = crate::connect::sign::key_and_csr()
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            let (mut leaf, _) = app
                .node
                .sign_leaf(LeafRequest {
                    datacenter: &app.datacenter,
                    service: &service,
                    csr_pem: &csr,
                })
                .await
                .map_err(|e| match e {
                    SignError::Cluster(e) => ApiError::from(e),
                    SignError::Ca(e @ CaError::NotReady) => ApiError::Internal(e.to_string()),
                    SignError::Ca(CaError::Csr(m)) => ApiError::bad_request(m),
                    SignError::Ca(e) => ApiError::Internal(e.to_string()),
                })?;
            leaf.private_key_pem = Some(key);
            app.leaves
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(service.clone(), leaf.clone());
            leaf
        }
    };
    let value = json!({
        "SerialNumber": leaf.serial,
        "CertPEM": leaf.chain_pem,
        "PrivateKeyPEM": leaf.private_key_pem.as_deref().unwrap_or_default(),
        "Service": leaf.service,
        "ServiceURI": leaf.spiffe_id,
        "ValidAfter": rfc3339(leaf.valid_after_unix),
        "ValidBefore": rfc3339(leaf.valid_before_unix),
        "CreateIndex": state.ca.index,
        "ModifyIndex": state.ca.index,
    });
    let mut response = axum::Json(value).into_response();
    response
        .headers_mut()
        .insert("X-Consul-Index", HeaderValue::from(state.ca.index));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration_secs(72 * 3600), "72h0m0s");
        assert_eq!(go_duration_secs(90), "1m30s");
        assert_eq!(go_duration_secs(5), "5s");
    }
}
