//! Intentions for the inbound listener: the `service-intentions` entries
//! named after this sidecar's service and `*`, compiled into an
//! [`IntentionSet`] (default from the CA roots' `default_intention`) and
//! swapped in whole on every change, so the next request or connection is
//! decided by the new set without a reconnect. Until the first snapshot of
//! both topics has arrived nothing is let through ([`Authz::Pending`]):
//! the sidecar refuses rather than guesses.
//!
//! Lock rule: `set` is held only to clone or replace the `Arc`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use meshwork_core::intentions::{DecidedBy, IntentionSet, Request, Rule};
use meshwork_proto::v1::ConfigEntry;
use tokio_util::sync::CancellationToken;

use super::applied::AppliedConfig;
use crate::discovery::Discovery;

/// The config entry kind followed.
pub const KIND: &str = "service-intentions";

/// The compiled intentions of this service, shared by every inbound
/// connection; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Intentions {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    set: RwLock<Option<Arc<IntentionSet>>>,
    allowed: AtomicU64,
    denied: AtomicU64,
}

/// The verified caller of an inbound connection and the intentions it is
/// checked against (one per connection, shared by its requests).
#[derive(Debug)]
pub struct Caller {
    /// The source service, from its certificate's SPIFFE ID.
    pub service: Arc<str>,
    pub intentions: Intentions,
    /// This service's rate limits (checked after the intentions).
    pub limits: crate::policy::ratelimit::Limits,
    /// When the caller's certificate stops verifying (Unix seconds, the
    /// earliest `notAfter` of its chain): the connection's one timer is set
    /// for it. `None` when it could not be read (then no timer).
    pub not_after_unix: Option<i64>,
    /// Set by that timer: a request that comes after it is refused before
    /// the intentions or the app see it. Read once per request (a relaxed
    /// load, no clock).
    expired: AtomicBool,
}

impl Caller {
    pub fn new(
        service: Arc<str>,
        (intentions, limits): (Intentions, crate::policy::ratelimit::Limits),
        not_after_unix: Option<i64>,
    ) -> Self {
        Caller {
            service,
            intentions,
            limits,
            not_after_unix,
            expired: AtomicBool::new(false),
        }
    }

    /// The caller's certificate has expired (its connection's timer fired).
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    /// Called by the connection's timer at `not_after_unix`.
    pub fn mark_expired(&self) {
        self.expired.store(true, Ordering::Relaxed);
    }
}

/// A decision as the proxy acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// Let through; the rule that decided (for logs: shown only when
    /// logged, so an allowed request formats nothing).
    Allow(Rule),
    /// Let through by an L7 intention's permissions (or by the default
    /// because none matched): the request itself was judged, so what
    /// follows it on a tunnel could not be.
    AllowL7(Rule),
    /// Refused by this rule.
    Deny(String),
    /// No intentions known yet: refuse without deciding.
    Pending,
}

impl Intentions {
    fn current(&self) -> Option<Arc<IntentionSet>> {
        self.inner
            .set
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(&self, allow: bool, rule: Rule) -> Authz {
        if allow {
            self.inner.allowed.fetch_add(1, Ordering::Relaxed);
            Authz::Allow(rule)
        } else {
            self.inner.denied.fetch_add(1, Ordering::Relaxed);
            Authz::Deny(rule.to_string())
        }
    }

    /// A connection from `source` (L4).
    pub fn decide_connection(&self, source: &str) -> Authz {
        let Some(set) = self.current() else {
            return Authz::Pending;
        };
        let d = set.decide_connection(source);
        self.count(d.allow, d.rule)
    }

    /// One HTTP request from `source`; `path` already normalised.
    pub fn decide_request(
        &self,
        source: &str,
        method: &str,
        path: &str,
        headers: &hyper::HeaderMap,
    ) -> Authz {
        let Some(set) = self.current() else {
            return Authz::Pending;
        };
        let d = set.decide_request(source, &Request::new(method, path, headers));
        let layer7 = matches!(
            d.rule,
            meshwork_core::intentions::Rule::Intention {
                by: DecidedBy::Permission(_) | DecidedBy::NoPermission,
                ..
            }
        );
        match self.count(d.allow, d.rule) {
            Authz::Allow(rule) if layer7 => Authz::AllowL7(rule),
            other => other,
        }
    }

    pub(crate) fn install(&self, set: IntentionSet) {
        *self.inner.set.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
    }

    /// `meshwork_sidecar_intention_decisions_total` for `/metrics`.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP meshwork_sidecar_intention_decisions_total Inbound connections and requests decided by intentions.\n# TYPE meshwork_sidecar_intention_decisions_total counter\nmeshwork_sidecar_intention_decisions_total{{decision=\"allow\"}} {}\nmeshwork_sidecar_intention_decisions_total{{decision=\"deny\"}} {}\n",
            self.inner.allowed.load(Ordering::Relaxed),
            self.inner.denied.load(Ordering::Relaxed),
        )
    }

    /// Whether a set has been compiled (for `/status`).
    pub fn loaded(&self) -> bool {
        self.current().is_some()
    }
}

/// Compiles the entries that apply to `service` with `default_allow`.
pub fn compile(
    service: &str,
    entries: &BTreeMap<String, ConfigEntry>,
    default_allow: bool,
) -> Result<IntentionSet, String> {
    let mut bodies = Vec::new();
    for name in [service, "*"] {
        let Some(entry) = entries.get(name) else {
            continue;
        };
        bodies.push((name, super::entry_body(entry)?));
    }
    IntentionSet::compile(
        service,
        bodies.iter().map(|(name, body)| (*name, body)),
        default_allow,
    )
    .map_err(|e| e.to_string())
}

/// Follows the intentions and the CA roots' default until `shutdown`,
/// compiling a new set on every change of either.
pub async fn run(
    intentions: Intentions,
    service: String,
    discovery: Discovery,
    applied: AppliedConfig,
    shutdown: CancellationToken,
) {
    let mut entries = discovery.config_entries(KIND);
    let consumer = applied.consumer("intentions", &[KIND]);
    let mut roots = discovery.ca_roots();
    loop {
        {
            let entries = Arc::clone(&entries.borrow_and_update());
            let roots = Arc::clone(&roots.borrow_and_update());
            if let (true, Some(ca)) = (entries.ready, roots.value.as_ref().filter(|_| roots.ready))
            {
                let default_allow = ca.default_intention != "deny";
                match compile(&service, &entries.value, default_allow) {
                    Ok(set) => {
                        if !intentions.loaded() {
                            tracing::info!(
                                index = entries.index,
                                default_allow,
                                "intentions loaded"
                            );
                        }
                        intentions.install(set);
                        consumer.applied(&[(KIND, entries.index)], None);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "intentions refused; keeping the previous ones");
                        consumer.applied(&[(KIND, entries.index)], Some(e));
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = entries.changed() => if changed.is_err() { return },
            changed = roots.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, json: &str) -> (String, ConfigEntry) {
        (
            name.to_owned(),
            ConfigEntry {
                kind: KIND.into(),
                name: name.into(),
                json: json.into(),
                create_index: 1,
                modify_index: 1,
            },
        )
    }

    #[test]
    fn entries_for_this_service_and_the_wildcard_decide() {
        let intentions = Intentions::default();
        let headers = hyper::HeaderMap::new();
        assert_eq!(intentions.decide_connection("web"), Authz::Pending);
        assert_eq!(
            intentions.decide_request("web", "GET", "/", &headers),
            Authz::Pending
        );
        let entries: BTreeMap<_, _> = [
            entry(
                "api",
                r#"{"Kind":"service-intentions","Name":"api","CreateIndex":1,"ModifyIndex":1,"Sources":[{"Name":"web","Permissions":[{"Action":"deny","HTTP":{"PathPrefix":"/admin"}},{"Action":"allow","HTTP":{"PathPrefix":"/"}}]}]}"#,
            ),
            entry("*", r#"{"Sources":[{"Name":"db","Action":"deny"}]}"#),
            entry("other", "not even JSON"),
        ]
        .into_iter()
        .collect();
        intentions.install(compile("api", &entries, true).expect("compiled"));
        // Allowed by a permission: an L7 decision (no tunnels on it).
        assert!(matches!(
            intentions.decide_request("web", "GET", "/orders", &headers),
            Authz::AllowL7(_)
        ));
        // An L4 intention or the default: a plain allow.
        assert!(matches!(
            intentions.decide_request("billing", "GET", "/orders", &headers),
            Authz::Allow(_)
        ));
        assert!(matches!(
            intentions.decide_request("web", "GET", "/admin/x", &headers),
            Authz::Deny(_)
        ));
        assert!(matches!(intentions.decide_connection("db"), Authz::Deny(_)));
        assert!(matches!(
            intentions.decide_connection("billing"),
            Authz::Allow(_)
        ));
        let metrics = intentions.render_metrics();
        assert!(metrics.contains("{decision=\"allow\"} 3"), "{metrics}");
        assert!(metrics.contains("{decision=\"deny\"} 2"), "{metrics}");
        // Default deny from the roots.
        intentions.install(compile("api", &BTreeMap::new(), false).expect("compiled"));
        assert!(matches!(
            intentions.decide_connection("web"),
            Authz::Deny(_)
        ));
        // A broken entry for this service is refused whole.
        let broken: BTreeMap<_, _> = [entry("api", "[]")].into_iter().collect();
        assert!(compile("api", &broken, true).is_err());
    }
}
