//! `/v1/kv/<key>`: Consul's key/value endpoint.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;

use super::AppState;
use super::authz::{Authz, mark_filtered};
use super::error::ApiError;
use super::query::{Params, ReadOptions, read_headers, run_read};
use super::waiters::IndexOf;
use crate::auth::{Kind, Need};
use crate::command::{Command, CommandResponse};
use crate::state::KvEntry;

/// Largest value accepted (Consul's limit).
pub const MAX_VALUE_BYTES: usize = 512 * 1024;
/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 512;

/// One entry as Consul's JSON shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KvPair<'a> {
    lock_index: u64,
    key: &'a str,
    flags: u64,
    /// base64; `null` for an empty value, as Consul.
    value: Option<String>,
    /// The lock holder; absent when unlocked (as Consul's `omitempty`).
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    create_index: u64,
    modify_index: u64,
}

impl<'a> KvPair<'a> {
    pub(super) fn new(key: &'a str, entry: &'a KvEntry) -> Self {
        KvPair {
            lock_index: entry.lock_index,
            key,
            flags: entry.flags,
            value: (!entry.value.is_empty()).then(|| STANDARD.encode(&entry.value)),
            session: entry.session.as_deref(),
            create_index: entry.create_index,
            modify_index: entry.modify_index,
        }
    }
}

/// Every method on `/v1/kv/...`.
pub async fn handle(
    State(app): State<AppState>,
    authz: Authz,
    method: Method,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Nothing that points into the request head (the URI, the header
    // values) may live across a blocking wait: it would pin hyper's 8 KiB
    // read buffer for each parked request.
    let key = match key_from_path(uri.path()) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    drop(uri);
    let params = Params::parse(query.as_deref());
    let result = match method {
        Method::GET => {
            drop((headers, body));
            get(&app, &authz, &key, &params).await
        }
        Method::PUT | Method::POST => put(&app, &authz, key, &params, &headers, body).await,
        Method::DELETE => delete(&app, &authz, key, &params).await,
        other => Err(ApiError::MethodNotAllowed(format!(
            "method {other} not allowed on /v1/kv (use GET, PUT or DELETE)"
        ))),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The key is the rest of the path after `/v1/kv/`, percent-decoded.
fn key_from_path(path: &str) -> Result<String, ApiError> {
    let raw = path
        .strip_prefix("/v1/kv/")
        .or_else(|| path.strip_prefix("/v1/kv").filter(|r| r.is_empty()))
        .unwrap_or("");
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let key = String::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request("Invalid key: not valid UTF-8"))?;
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "Invalid key: {} bytes long, the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(key)
}

async fn get(
    app: &AppState,
    authz: &Authz,
    key: &str,
    params: &Params,
) -> Result<Response, ApiError> {
    let options = ReadOptions::from_params(params)?;
    let node = &app.node;
    let shutdown = &app.shutdown;
    let mut headers;
    let body: Option<Response>;
    // Lists keep what the token may read (Consul without
    // `enable_key_list_policy`); an empty result is a 404 either way.
    if params.has("keys") {
        let separator = params.get("separator").map(str::to_owned);
        let result = run_read(
            node,
            &app.waiters,
            options,
            shutdown,
            (&IndexOf::Prefix(key.to_owned()), authz),
            |state, authz| {
                let mut keys = state.kv.keys(key, separator.as_deref());
                let filtered =
                    crate::auth::filter(&mut keys, |k| authz.allows(Kind::Key, k, Need::Read));
                (keys, filtered)
            },
        )
        .await?;
        let (keys, filtered) = result.value;
        headers = read_headers(node, result.index, options.consistency);
        mark_filtered(&mut headers, filtered);
        body = (!keys.is_empty()).then(|| axum::Json(keys).into_response());
    } else if params.present("recurse") {
        let result = run_read(
            node,
            &app.waiters,
            options,
            shutdown,
            (&IndexOf::Prefix(key.to_owned()), authz),
            |state, authz| {
                let mut pairs: Vec<KvPair<'_>> = state
                    .kv
                    .prefix_range(key)
                    .map(|(k, e)| KvPair::new(k, e))
                    .collect();
                let filtered =
                    crate::auth::filter(&mut pairs, |p| authz.allows(Kind::Key, p.key, Need::Read));
                (
                    (!pairs.is_empty()).then(|| serde_json::to_vec(&pairs)),
                    filtered,
                )
            },
        )
        .await?;
        let (pairs, filtered) = result.value;
        headers = read_headers(node, result.index, options.consistency);
        mark_filtered(&mut headers, filtered);
        body = pairs.transpose().map_err(|e| internal(&e))?.map(json_bytes);
    } else {
        if key.is_empty() {
            return Err(ApiError::bad_request("Missing key name"));
        }
        authz.require(Kind::Key, key, Need::Read)?;
        let raw = params.present("raw");
        let result = run_read(
            node,
            &app.waiters,
            options,
            shutdown,
            (&IndexOf::Key(key.to_owned()), authz),
            |state, _| {
                state.kv.get(key).map(|entry| {
                    if raw {
                        Ok(entry.value.to_vec())
                    } else {
                        serde_json::to_vec(&[KvPair::new(key, entry)])
                    }
                })
            },
        )
        .await?;
        headers = read_headers(node, result.index, options.consistency);
        body = match result.value.transpose().map_err(|e| internal(&e))? {
            None => None,
            Some(bytes) if raw => {
                let mut response = bytes.into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                Some(response)
            }
            Some(bytes) => Some(json_bytes(bytes)),
        };
    }
    let mut response = body.unwrap_or_else(|| StatusCode::NOT_FOUND.into_response());
    headers.extend(response.headers().clone());
    *response.headers_mut() = headers;
    Ok(response)
}

fn json_bytes(bytes: Vec<u8>) -> Response {
    let mut response = bytes.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn internal(e: &serde_json::Error) -> ApiError {
    ApiError::Cluster(crate::cluster::ClusterError::Internal(e.to_string()))
}

async fn put(
    app: &AppState,
    authz: &Authz,
    key: String,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let flags = params.u64("flags")?.unwrap_or(0);
    let cas = params.u64("cas")?;
    // As Consul: at most one of ?cas, ?acquire and ?release; an empty
    // session is Consul's "missing session".
    let given = ["cas", "acquire", "release"]
        .iter()
        .filter(|k| params.has(k))
        .count();
    if given > 1 {
        return Err(ApiError::bad_request(format!(
            "Conflicting flags: {}",
            params.encoded()
        )));
    }
    let lock = |name: &str| -> Result<Option<String>, ApiError> {
        match params.get(name) {
            None => Ok(None),
            Some("") => Err(ApiError::Internal("missing session".into())),
            Some(id) => Ok(Some(id.to_owned())),
        }
    };
    let (acquire, release) = (lock("acquire")?, lock("release")?);
    authz.require(Kind::Key, &key, Need::Write)?;
    let value = read_body(headers, body, MAX_VALUE_BYTES).await?;
    let command = if let Some(session) = acquire {
        Command::KvLock {
            key,
            value,
            flags,
            session,
            cas: None,
        }
    } else if let Some(session) = release {
        Command::KvUnlock {
            key,
            value,
            flags,
            session,
            cas: None,
        }
    } else {
        Command::KvSet {
            key,
            value,
            flags,
            cas,
        }
    };
    let applied = app.node.write(command).await?;
    if let CommandResponse::Refused(why) = applied.response {
        return Err(ApiError::Internal(why));
    }
    Ok(axum::Json(applied.response.succeeded()).into_response())
}

/// Reads a request body, refusing more than `max` bytes before buffering
/// it (by Content-Length when given, else while reading).
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<Vec<u8>, ApiError> {
    let too_large = |len: Option<u64>| {
        ApiError::PayloadTooLarge(match len {
            Some(len) => {
                format!("Request body({len} bytes) too large, max size: {max} bytes")
            }
            None => format!("Request body too large, max size: {max} bytes"),
        })
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(too_large(Some(len)));
    }
    match axum::body::to_bytes(body, max).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let is_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if is_limit {
                Err(too_large(None))
            } else {
                Err(ApiError::bad_request(format!(
                    "cannot read request body: {e}"
                )))
            }
        }
    }
}

async fn delete(
    app: &AppState,
    authz: &Authz,
    key: String,
    params: &Params,
) -> Result<Response, ApiError> {
    let cas = params.u64("cas")?;
    let command = if params.present("recurse") {
        if cas.is_some() {
            return Err(ApiError::bad_request(
                "?cas cannot be combined with ?recurse",
            ));
        }
        // Every key under the prefix must be writable (Consul's
        // `KeyWritePrefix`): a deny below it refuses the whole delete.
        authz.require_prefix(Kind::Key, &key, Need::Write)?;
        Command::KvDeleteTree { prefix: key }
    } else {
        if key.is_empty() {
            return Err(ApiError::bad_request("Missing key name"));
        }
        authz.require(Kind::Key, &key, Need::Write)?;
        Command::KvDelete { key, cas }
    };
    let applied = app.node.write(command).await?;
    Ok(axum::Json(applied.response.succeeded()).into_response())
}
