//! Health as the catalog records it and as both binaries judge it: the
//! status of a check, how a check is defined, and one run of an HTTP or TCP
//! probe ([`probe`]). The registry's leader runs the checks registered over
//! REST with these; a sidecar runs its own service's checks with the same
//! code, so a check means the same thing wherever it runs.

pub mod probe;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A check's health, ordered from best to worst.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Passing,
    Warning,
    #[default]
    Critical,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Warning => "warning",
            HealthStatus::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "passing" => Some(HealthStatus::Passing),
            "warning" => Some(HealthStatus::Warning),
            "critical" => Some(HealthStatus::Critical),
            _ => None,
        }
    }
}

/// How a check is run, as registered. Durations in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDefinition {
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub header: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub tls_skip_verify: bool,
    #[serde(default)]
    pub tcp: Option<String>,
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub deregister_critical_after_ms: Option<u64>,
    /// A sidecar's heartbeat session (a node check): critical when the
    /// sidecar sent no heartbeat within this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_ttl_ms: Option<u64>,
    /// Run by a sidecar, which reports its status; this names what it
    /// probes (e.g. `http://127.0.0.1:8080/health`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,
}

impl CheckDefinition {
    /// Consul's `Type` of the check.
    pub fn kind(&self) -> &'static str {
        if self.http.is_some() {
            "http"
        } else if self.tcp.is_some() {
            "tcp"
        } else if self.ttl_ms.is_some() {
            "ttl"
        } else if self.session_ttl_ms.is_some() {
            "session"
        } else if self.sidecar.is_some() {
            "sidecar"
        } else {
            ""
        }
    }
}
