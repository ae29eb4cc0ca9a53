//! The mesh CA's leader duties: make the cluster's first root when there
//! is none (a new cluster's first leader, once the cluster id is set), and
//! prune rotated-out roots once no leaf they signed can still be valid
//! (a leaf lifetime, plus a minute for clocks, after their rotation).
//! Rotations themselves come from `PUT /v1/connect/ca/configuration`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::RegistryNode;
use crate::command::Command;
use crate::config::ConnectSettings;
use crate::raft::directory::PROTOCOL_CA;
use crate::state::ca::{CaConfig, CaStore};

/// How often the leader looks (a look is a read of two fields: a new
/// cluster's sidecars wait for the first root).
const EVERY: Duration = Duration::from_millis(100);

/// Slack for clocks between rotation and pruning.
const PRUNE_GRACE_SECS: i64 = 60;

/// The roots whose leaves have all expired by `now_unix`.
pub fn prunable(ca: &CaStore, now_unix: i64) -> Vec<String> {
    ca.roots
        .iter()
        .filter(|r| !r.active)
        .filter(|r| {
            // The longest lifetime its leaves had (roots recorded before
            // that was kept: the longer of the current and the default).
            let ttl = match r.max_leaf_ttl_secs {
                0 => ca.config.leaf_cert_ttl_secs.max(72 * 3600),
                ttl => ttl,
            };
            let ttl = i64::try_from(ttl).unwrap_or(i64::MAX / 4);
            r.rotated_out_unix
                .is_none_or(|at| now_unix > at.saturating_add(ttl).saturating_add(PRUNE_GRACE_SECS))
                || r.not_after_unix <= now_unix
        })
        .map(|r| r.id.clone())
        .collect()
}

/// Runs until `shutdown`.
pub async fn run(node: Arc<RegistryNode>, settings: ConnectSettings, shutdown: CancellationToken) {
    if !settings.enabled {
        return;
    }
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held_back_logged = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !node.is_leader() {
            continue;
        }
        let now = crate::connect::now_unix();
        let (cluster_id, has_root, ids) = {
            let state = node.state.read();
            (
                state.cluster_id.clone(),
                state.ca.active().is_some(),
                prunable(&state.ca, now),
            )
        };
        let Some(cluster_id) = cluster_id else {
            continue;
        };
        if !has_root {
            let voters = node.members().into_iter().filter(|m| m.voter).map(|m| m.id);
            if !node.channels.directory.all_speak(voters, PROTOCOL_CA) {
                if !held_back_logged {
                    tracing::info!(
                        "mesh CA held back: not every server runs a version that has it yet"
                    );
                    held_back_logged = true;
                }
                continue;
            }
            let config = CaConfig {
                leaf_cert_ttl_secs: settings.leaf_cert_ttl.as_secs(),
                ..CaConfig::default()
            };
            let td = crate::connect::trust_domain(&cluster_id);
            let root =
                match crate::connect::generate_root(&td, config.root_cert_ttl_secs, now, None) {
                    Ok(root) => root,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot make the mesh CA's root");
                        continue;
                    }
                };
            let id = root.id.clone();
            let command = Command::CaRotate {
                expect_active: None,
                root: Box::new(root),
                config: Some(config),
                now_unix: now,
            };
            match node.write(command).await {
                Ok(applied) if applied.response.succeeded() => {
                    tracing::info!(root_id = %id, trust_domain = %td, "mesh CA root created");
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "mesh CA root not written; next round"),
            }
            continue;
        }
        if ids.is_empty() {
            continue;
        }
        match node.write(Command::CaPrune { ids: ids.clone() }).await {
            Ok(_) => tracing::info!(roots = ?ids, "rotated-out mesh CA roots removed"),
            Err(e) => tracing::debug!(error = %e, "mesh CA prune not written; next round"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ca::CaRoot;

    fn root(id: &str, active: bool, rotated_out: Option<i64>) -> CaRoot {
        CaRoot {
            id: id.into(),
            name: id.into(),
            serial: "01".into(),
            root_cert_pem: String::new(),
            intermediate_cert_pems: vec![],
            cross_signed_by: None,
            max_leaf_ttl_secs: 100,
            private_key_pem: String::new(),
            not_before_unix: 0,
            not_after_unix: 1_000_000,
            active,
            rotated_out_unix: rotated_out,
            create_index: 1,
            modify_index: 1,
        }
    }

    #[test]
    fn old_roots_go_a_leaf_lifetime_after_their_rotation() {
        let mut ca = CaStore::default();
        ca.config.leaf_cert_ttl_secs = 100;
        ca.roots = vec![root("old", false, Some(1000)), root("new", true, None)];
        assert!(prunable(&ca, 1000 + 100 + PRUNE_GRACE_SECS).is_empty());
        assert_eq!(prunable(&ca, 1000 + 101 + PRUNE_GRACE_SECS), vec!["old"]);
        // Expired roots go whatever their rotation time.
        assert_eq!(prunable(&ca, 1_000_000), vec!["old"]);
    }
}
