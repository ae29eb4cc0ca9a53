//! Query-string options shared by every read: consistency mode and
//! blocking (`?index=&wait=`), and the response headers that go with them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::waiters::{IndexOf, Waiters};
use crate::auth::Resolved;
use crate::cluster::{Consistency, RegistryNode};
use crate::state::State;
use meshwork_core::duration::parse_duration;

/// Default and maximum `?wait` of a blocking query (Consul's).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// The query string as flags and values (`?recurse` has value "").
/// A repeated key keeps its first value in `get` and all in `get_all`.
#[derive(Debug, Default)]
pub struct Params(HashMap<String, String>, Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>) -> Self {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut first = HashMap::new();
        for (k, v) in &pairs {
            first.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Params(first, pairs)
    }

    /// Every value of a repeated key, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.1
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A flag Consul reads by presence (`?recurse`, `?raw`, `?stale`,
    /// `?consistent`): set whatever its value, `?recurse=false` included,
    /// as Consul.
    pub fn present(&self, key: &str) -> bool {
        self.has(key)
    }

    /// A boolean parameter as Consul reads `?passing`: present with no
    /// value means true, else Go's `strconv.ParseBool` spellings.
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some("" | "1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "Invalid value for ?{key}: {other:?}"
            ))),
        }
    }

    /// The query string re-encoded with its keys sorted (as Go's
    /// `url.Values.Encode`, which Consul quotes in some errors).
    pub fn encoded(&self) -> String {
        let mut pairs = self.1.clone();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("Invalid {key}: {v:?} is not an unsigned integer"))
            }),
        }
    }
}

/// How a read should be served.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    pub consistency: Consistency,
    /// Block until the result's index passes this.
    pub min_index: Option<u64>,
    pub wait: Duration,
}

impl ReadOptions {
    pub fn from_params(params: &Params) -> Result<Self, ApiError> {
        let stale = params.present("stale");
        let consistent = params.present("consistent");
        let consistency = match (stale, consistent) {
            (true, true) => {
                return Err(ApiError::bad_request(
                    "Cannot specify ?stale with ?consistent, conflicting semantics.",
                ));
            }
            (true, false) => Consistency::Stale,
            (false, true) => Consistency::Consistent,
            (false, false) => Consistency::Default,
        };
        let min_index = params.u64("index")?.filter(|i| *i > 0);
        let wait = match params.get("wait") {
            None | Some("") => DEFAULT_WAIT,
            Some(text) => parse_duration(text)
                .ok_or_else(|| ApiError::bad_request(format!("Invalid wait time: {text:?}")))?
                .min(MAX_WAIT),
        };
        Ok(Self {
            consistency,
            min_index,
            wait,
        })
    }
}

/// A read's result and the index it reports.
#[derive(Debug)]
pub struct Indexed<T> {
    pub value: T,
    pub index: u64,
}

/// Runs a read: waits for the consistency barrier, then answers with
/// `compute` and the index of `what`. A blocking query parks until that
/// index passes `min_index` or the wait (plus up to 1/16 jitter, as
/// Consul) runs out. Parked, it is woken only when its own index moves
/// (see [`Waiters`]), not by changes elsewhere. Shutdown ends the wait
/// early.
pub async fn run_read<T>(
    node: &RegistryNode,
    waiters: &Waiters,
    options: ReadOptions,
    shutdown: &CancellationToken,
    (what, authz): (&IndexOf, &super::authz::Authz),
    compute: impl Fn(&State, &Resolved) -> T,
) -> Result<Indexed<T>, ApiError> {
    // Boxed: the barrier's future (a gRPC call to the leader) is large, and
    // inline it would size the state of every parked blocking query.
    Box::pin(node.read_barrier(options.consistency)).await?;
    // Index 0 would make clients spin; Consul reports at least 1.
    let answer = |state: &State, rights: &Resolved| Indexed {
        index: what.index(state).max(1),
        value: compute(state, rights),
    };
    let Some(min) = options.min_index else {
        // The token as of the barrier too: a token revoked through another
        // server (acknowledged before this read began) is refused here even
        // when the extractor resolved it on this server's older replica.
        // A stale read answers from this server's state, token included.
        if options.consistency == Consistency::Stale {
            return Ok(answer(&node.state.read(), authz));
        }
        let rights = authz.refresh()?;
        return Ok(answer(&node.state.read(), &rights));
    };
    let jitter_ms = rand::rng().random_range(0..=(options.wait.as_millis() as u64 / 16).max(1));
    let deadline = Instant::now() + options.wait + Duration::from_millis(jitter_ms);
    let _parked = crate::metrics::GaugeGuard::new(&crate::metrics::METRICS.blocking_queries);
    // Join the group first, then look: a change in between is not missed.
    let mut group = waiters.subscribe(what);
    let due_now = {
        let state = node.state.read();
        (what.index(&state).max(1) > min).then(|| answer(&state, authz))
    };
    if let Some(due) = due_now {
        waiters.release(what, group);
        return Ok(due);
    }
    tokio::select! {
        _ = tokio::time::timeout_at(deadline, group.wait_for(|index| (*index).max(1) > min)) => {}
        () = shutdown.cancelled() => {}
    }
    waiters.release(what, group);
    // Due, timed out or shutting down: the answer as it stands, for the
    // token as it stands (revoked while waiting: refused).
    let rights = authz.refresh()?;
    Ok(answer(&node.state.read(), &rights))
}

/// Consul's read headers: the index, and how fresh the answering server is.
pub fn read_headers(node: &RegistryNode, index: u64, consistency: Consistency) -> HeaderMap {
    let (known_leader, last_contact) = node.leader_contact();
    let mut headers = HeaderMap::new();
    headers.insert("X-Consul-Index", HeaderValue::from(index));
    headers.insert(
        "X-Consul-KnownLeader",
        HeaderValue::from_static(if known_leader { "true" } else { "false" }),
    );
    headers.insert(
        "X-Consul-LastContact",
        HeaderValue::from(last_contact.as_millis() as u64),
    );
    headers.insert(
        "X-Consul-Effective-Consistency",
        HeaderValue::from_static(match consistency {
            Consistency::Default => "leader",
            Consistency::Consistent => "consistent",
            Consistency::Stale => "stale",
        }),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_reads_compute_once_per_applied_change() {
        let reads = SharedReads::default();
        let mut state = State::default();
        let mut computed = 0;
        for _ in 0..3 {
            let (body, _) = reads.get_or_compute("k", &state, |_| {
                computed += 1;
                (bytes::Bytes::from_static(b"[]"), false)
            });
            assert_eq!(&body[..], b"[]");
        }
        assert_eq!(computed, 1);
        state.last_index = 9;
        reads.get_or_compute("k", &state, |_| {
            computed += 1;
            (bytes::Bytes::new(), false)
        });
        assert_eq!(computed, 2);
        assert_eq!(
            shared_read_key(
                "/v1/health/service/web",
                Some("wait=5s&tag=b&index=3&tag=a&stale")
            ),
            shared_read_key("/v1/health/service/web", Some("tag=a&tag=b"))
        );
        assert_ne!(
            shared_read_key("/v1/health/service/web", Some("passing")),
            shared_read_key("/v1/health/service/web", None)
        );
        // A name carrying a separator is not another question's key.
        assert_ne!(
            shared_read_key("/v1/health/service/web", Some("passing%3D1%01tag=prod")),
            shared_read_key("/v1/health/service/web", Some("passing=1&tag=prod"))
        );
    }

    #[test]
    fn stale_and_consistent_conflict() {
        let params = Params::parse(Some("stale&consistent"));
        assert!(ReadOptions::from_params(&params).is_err());
        let params = Params::parse(Some("index=abc"));
        assert!(ReadOptions::from_params(&params).is_err());
        let params = Params::parse(Some("index=5&wait=20m"));
        let options = ReadOptions::from_params(&params).expect("valid");
        assert_eq!(options.wait, MAX_WAIT);
        assert_eq!(options.min_index, Some(5));
    }
}

/// Results of blocking-capable reads, computed once per applied change and
/// shared by every waiter asking the same question: when 10,000 watchers
/// of one service wake on a change, the first computes and encodes the
/// answer, the rest copy a reference to it.
#[derive(Debug, Default)]
pub struct SharedReads {
    entries: std::sync::Mutex<HashMap<String, Arc<std::sync::Mutex<Option<SharedRead>>>>>,
}

/// One encoded answer and the state it was computed from.
#[derive(Debug, Clone)]
struct SharedRead {
    /// The state's applied index when computed: valid until it moves.
    applied: u64,
    body: bytes::Bytes,
    /// Whether ACLs left entries out of it.
    filtered: bool,
}

/// Distinct questions kept before unused ones are dropped.
const SHARED_READS_MAX: usize = 4096;

impl SharedReads {
    /// The answer to `key` for `state`, computing it only if no waiter has
    /// done so since the last applied change.
    pub fn get_or_compute(
        &self,
        key: &str,
        state: &State,
        compute: impl FnOnce(&State) -> (bytes::Bytes, bool),
    ) -> (bytes::Bytes, bool) {
        let slot = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if entries.len() >= SHARED_READS_MAX && !entries.contains_key(key) {
                entries.retain(|_, slot| Arc::strong_count(slot) > 1);
            }
            Arc::clone(entries.entry(key.to_owned()).or_default())
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(read) = slot.as_ref()
            && read.applied == state.last_index
        {
            return (read.body.clone(), read.filtered);
        }
        let (body, filtered) = compute(state);
        *slot = Some(SharedRead {
            applied: state.last_index,
            body: body.clone(),
            filtered,
        });
        (body, filtered)
    }
}

/// The cache key of a read: its path and the parameters that shape the
/// answer (not those that only say how long or how consistently to wait).
pub fn shared_read_key(path: &str, query: Option<&str>) -> String {
    const NOT_SHAPING: &[&str] = &[
        "index",
        "wait",
        "stale",
        "consistent",
        "cached",
        "token",
        "near",
    ];
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| !NOT_SHAPING.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.sort();
    // Encoded again: a name or value holding a separator cannot pass for
    // another question's key.
    let mut encoded = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &pairs {
        encoded.append_pair(k, v);
    }
    let mut key = path.to_owned();
    key.push('?');
    key.push_str(&encoded.finish());
    key
}
