//! Config reload (SIGHUP, `systemctl reload`): the file is read and
//! validated again as at start; a bad file changes nothing and says why
//! (log, `/status`, metrics). A good one is applied without a restart:
//! the proxy's listeners, routes and upstream settings
//! ([`crate::listener::Proxy::reload`]; in-flight requests and pooled
//! connections are kept), the registry server list (agent and discovery),
//! and the registration and checks (the agent registers again when what
//! the registry holds changed). Only `admin.listen` needs a restart.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::agent::{ConfigStatus, SharedStatus, lock};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::listener::{Proxy, ProxyChanges};
use crate::telemetry::unix_secs;

/// Applies reloads of one config file.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    proxy: Arc<Proxy>,
    discovery: Discovery,
    /// The config in use (the agent follows it).
    agent: watch::Sender<Arc<Config>>,
    status: SharedStatus,
}

/// Outcomes go to `/status` and, from there, `/metrics`.
pub fn render_metrics(config: &ConfigStatus) -> String {
    format!(
        "# HELP meshwork_sidecar_config_reloads_total Config reloads (SIGHUP) by result.\n\
         # TYPE meshwork_sidecar_config_reloads_total counter\n\
         meshwork_sidecar_config_reloads_total{{result=\"ok\"}} {}\n\
         meshwork_sidecar_config_reloads_total{{result=\"error\"}} {}\n",
        config.reloads, config.reload_failures,
    )
}

impl Reloader {
    /// `agent` is the channel the agent follows, holding the config
    /// loaded from `path` at start.
    pub fn new(
        path: PathBuf,
        proxy: Arc<Proxy>,
        discovery: Discovery,
        agent: watch::Sender<Arc<Config>>,
        status: SharedStatus,
    ) -> Self {
        lock(&status).config = ConfigStatus {
            file: path.display().to_string(),
            loaded_unix: Some(unix_secs()),
            ..ConfigStatus::default()
        };
        Self {
            path,
            proxy,
            discovery,
            agent,
            status,
        }
    }

    /// Reads the file again and applies it; on any error nothing changes.
    pub async fn reload(&mut self) -> Result<ProxyChanges, String> {
        let outcome = self.try_reload().await;
        let mut s = lock(&self.status);
        match &outcome {
            Ok(changes) => {
                s.config.reloads += 1;
                s.config.loaded_unix = Some(unix_secs());
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
                s.config.reload_failures += 1;
                s.config.last_reload_error = Some(e.clone());
                tracing::error!(error = %e, "config reload refused; the previous config stays in use");
            }
        }
        outcome
    }

    async fn try_reload(&mut self) -> Result<ProxyChanges, String> {
        let next = Config::load(&self.path).map_err(|e| e.to_string())?;
        let (admin, gateway) = {
            let current = self.agent.borrow();
            (current.admin, current.gateway.is_some())
        };
        if next.gateway.is_some() != gateway {
            return Err(format!(
                "{}: switching between [service] and [gateway] needs a restart",
                self.path.display()
            ));
        }
        if next.admin != admin {
            return Err(format!(
                "{}: admin.listen: changed from {admin} to {}, which needs a restart",
                self.path.display(),
                next.admin
            ));
        }
        // With the registry's defaults for the upstreams, as the follower
        // of those entries applies them (`policy::defaults`).
        let effective =
            crate::policy::defaults::effective(&next, &self.discovery).map_err(|e| {
                format!(
                    "{}: the registry's proxy defaults: {e}",
                    self.path.display()
                )
            })?;
        let changes = self
            .proxy
            .reload(&effective)
            .await
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let next = Arc::new(next);
        self.discovery.set_addresses(next.registry.clone());
        self.discovery.set_token(next.registry_token.clone());
        self.agent.send_replace(next);
        Ok(changes)
    }
}
