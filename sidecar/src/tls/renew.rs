//! The task that keeps the mesh identity current: it follows the
//! registry's `ca_roots` topic (through [`crate::discovery`]) and has the
//! leaf signed — at once at start, at ~60 % of each leaf's life (±10 %),
//! and within 1–3 s of the active root changing away from the one that
//! signed the leaf. A failed signing keeps the current leaf and is tried
//! again with backoff; with the registry gone, the leaf and roots in hand
//! go on working until they expire. Shortly before a leaf expires
//! ([`super::expiry::retire_margin`]) with no renewed one in hand, it
//! marks the leaf as expiring, so pooled connections made with it are
//! handed out no more.

use std::time::Duration;

use meshwork_core::backoff::Backoff;
use meshwork_proto::v1::SignLeafRequest;
use meshwork_proto::v1::agent_client::AgentClient;
use rand::Rng;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::expiry::{LeafStamp, retire_margin};
use super::leaf::{Leaf, Request, now_unix, renew_after};
use super::mesh::MeshTls;
use super::trust::Trust;
use crate::discovery::Discovery;

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// How soon after the active root changes the leaf is renewed: a random
/// point in this range, so a fleet does not come at once.
fn after_root_change() -> Duration {
    Duration::from_millis(rand::rng().random_range(1000..=3000))
}

fn jitter() -> f64 {
    rand::rng().random_range(-0.1..=0.1)
}

/// Runs until `shutdown`.
pub async fn run(mesh: MeshTls, discovery: Discovery, shutdown: CancellationToken) {
    let mut roots = discovery.ca_roots();
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut next = Instant::now();
    let mut server = 0usize;
    let mut first = true;
    let mut roots_open = true;
    // When the current leaf is about to expire, and its stamp.
    let mut expiring: Option<(Instant, LeafStamp)> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = roots.changed(), if roots_open => {
                if changed.is_err() {
                    roots_open = false;
                    continue;
                }
                let state = Arc::clone(&roots.borrow_and_update());
                let Some(ca) = state.value.as_ref().filter(|_| state.ready) else {
                    continue;
                };
                match Trust::from_roots(ca) {
                    Ok(trust) => {
                        let trust = Arc::new(trust);
                        let leaf = mesh.snapshot().leaf.clone();
                        tracing::debug!(trust_domain = %trust.trust_domain, active_root = %trust.active_root_id, roots = trust.root_ids.len(), "mesh CA roots updated");
                        if let Some(leaf) = leaf
                            && leaf.root_id != trust.active_root_id
                        {
                            let soon = Instant::now() + after_root_change();
                            if soon < next {
                                tracing::info!(leaf_root = %leaf.root_id, active_root = %trust.active_root_id, "the mesh CA's active root changed: renewing the leaf");
                                next = soon;
                            }
                        }
                        mesh.install(None, Some(trust));
                    }
                    Err(e) => tracing::warn!(error = %e, "mesh CA roots refused; keeping the previous ones"),
                }
            }
            () = sleep_until_some(expiring.map(|(at, _)| at)) => {
                if let Some((_, stamp)) = expiring.take() {
                    tracing::warn!("the mesh leaf is about to expire and no renewed one came: pooled connections made with it are no longer used");
                    mesh.leaf_expiring(stamp);
                }
            }
            () = tokio::time::sleep_until(next) => {
                let (addresses, access) = discovery.registry();
                // Config validation refuses an empty list.
                let addr = addresses[server % addresses.len()].clone();
                match sign(&addr, &access, mesh.service()).await {
                    Ok(leaf) => {
                        backoff.reset();
                        let now = now_unix();
                        // Its life counts from now: the CA backdates a
                        // leaf's start a minute for clock skew, which would
                        // put a short-lived leaf past its renewal point at
                        // once.
                        let start = leaf.valid_after_unix.max(now);
                        let wait = renew_after(start, leaf.valid_before_unix, now, jitter());
                        // A leaf already past its renewal point (a clock
                        // apart from the registry's): not again at once.
                        let wait = wait.max(BACKOFF_MIN);
                        next = Instant::now() + wait;
                        if first {
                            tracing::info!(spiffe_id = %leaf.spiffe_id.uri(), serial = %leaf.serial, valid_before = leaf.valid_before_unix, "mesh leaf certificate received");
                            first = false;
                        } else {
                            tracing::debug!(serial = %leaf.serial, "mesh leaf certificate renewed");
                        }
                        tracing::debug!(renew_in_secs = wait.as_secs(), "next leaf renewal");
                        let life = Duration::from_secs(
                            u64::try_from(leaf.valid_before_unix - start).unwrap_or(0),
                        );
                        let left = Duration::from_secs(
                            u64::try_from(leaf.valid_before_unix - now).unwrap_or(0),
                        );
                        let retire_in = left.saturating_sub(retire_margin(life));
                        let stamp = mesh.install(Some(Arc::new(leaf)), None);
                        expiring = Some((Instant::now() + retire_in, stamp));
                        mesh.renewal(Ok(()));
                    }
                    Err(e) => {
                        let wait = backoff.next_wait();
                        let current = mesh.snapshot().leaf.as_ref().map(|l| l.expires_in(now_unix()));
                        tracing::warn!(registry = %addr, error = %e, retry_in_ms = wait.as_millis() as u64, current_leaf_expires_in_secs = current, "mesh leaf signing failed; keeping the current leaf");
                        mesh.renewal(Err(e));
                        server += 1;
                        next = Instant::now() + wait;
                    }
                }
            }
        }
    }
}

/// Sleeps until `at`; for ever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A new key and CSR, signed by the registry at `addr`: the checked leaf,
/// or why not in one line.
async fn sign(addr: &str, access: &crate::RegistryAccess, service: &str) -> Result<Leaf, String> {
    let request = Request::new(service).map_err(|e| e.to_string())?;
    let channel = access.channel(addr, Some(RPC_TIMEOUT)).await?;
    let reply = AgentClient::with_interceptor(channel, access.clone())
        .sign_leaf(SignLeafRequest {
            service: service.to_owned(),
            csr_pem: request.csr_pem.clone(),
        })
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    request.accept(reply, service).map_err(|e| e.to_string())
}
