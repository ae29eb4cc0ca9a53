//! Config reload (SIGHUP, `systemctl reload`): the file is read and
//! validated again as at start; a bad file changes nothing and says why
//! (log, `/status`, metrics). A good one is applied without a restart:
//! the proxy's listeners, routes and upstream settings
//! ([`crate::proxy::Proxy::reload`]; in-flight requests and pooled
//! connections are kept), the registry server list (agent and discovery),
//! and the registration and checks (the agent registers again when what
//! the registry holds changed). Only `admin.listen` needs a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::agent::{ConfigStatus, SharedStatus};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::proxy::{Proxy, ProxyChanges};

/// Reload outcomes, for `/metrics`.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

impl ReloadCounters {
    /// Prometheus text.
    pub fn render(&self) -> String {
        format!(
            "# HELP meshwork_sidecar_config_reloads_total Config reloads (SIGHUP) by result.\n\
             # TYPE meshwork_sidecar_config_reloads_total counter\n\
             meshwork_sidecar_config_reloads_total{{result=\"ok\"}} {}\n\
             meshwork_sidecar_config_reloads_total{{result=\"error\"}} {}\n",
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Applies reloads of one config file.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    current: Arc<Config>,
    proxy: Arc<Proxy>,
    discovery: Discovery,
    agent: watch::Sender<Arc<Config>>,
    status: SharedStatus,
    counters: Arc<ReloadCounters>,
}

fn unix_now() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

impl Reloader {
    /// `agent` is the channel the agent follows; `current` was loaded
    /// from `path` at start.
    pub fn new(
        path: PathBuf,
        current: Arc<Config>,
        proxy: Arc<Proxy>,
        discovery: Discovery,
        agent: watch::Sender<Arc<Config>>,
        status: SharedStatus,
        counters: Arc<ReloadCounters>,
    ) -> Self {
        if let Ok(mut s) = status.lock() {
            s.config = ConfigStatus {
                file: path.display().to_string(),
                loaded_unix: unix_now(),
                ..ConfigStatus::default()
            };
        }
        Self {
            path,
            current,
            proxy,
            discovery,
            agent,
            status,
            counters,
        }
    }

    /// Reads the file again and applies it; on any error nothing changes.
    pub async fn reload(&mut self) -> Result<ProxyChanges, String> {
        let outcome = self.try_reload().await;
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match &outcome {
            Ok(changes) => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                s.config.reloads += 1;
                s.config.loaded_unix = unix_now();
                s.config.last_reload_error = None;
                tracing::info!(
                    added = ?changes.added,
                    removed = ?changes.removed,
                    replaced = ?changes.replaced,
                    reconfigured = ?changes.reconfigured,
                    "config reloaded"
                );
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                s.config.reload_failures += 1;
                s.config.last_reload_error = Some(e.clone());
                tracing::error!(error = %e, "config reload refused; the previous config stays in use");
            }
        }
        outcome
    }

    async fn try_reload(&mut self) -> Result<ProxyChanges, String> {
        let next = Config::load(&self.path).map_err(|e| e.to_string())?;
        if next.admin != self.current.admin {
            return Err(format!(
                "{}: admin.listen: changed from {} to {}, which needs a restart",
                self.path.display(),
                self.current.admin,
                next.admin
            ));
        }
        let changes = self
            .proxy
            .reload(&next)
            .await
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let next = Arc::new(next);
        self.discovery.set_addresses(next.registry.clone());
        self.agent.send_replace(Arc::clone(&next));
        self.current = next;
        Ok(changes)
    }
}
