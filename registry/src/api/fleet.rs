//! The sidecars of the whole cluster: this server's table
//! ([`crate::telemetry::sidecars`]) and the other servers', asked over the
//! internal port (`RaftInternal.LocalSidecars`). Used by the REST fleet
//! views and by the quota shares the agent service hands out.

use std::time::{Duration, Instant};

use meshwork_proto::v1::{LocalSidecarsReply, LocalSidecarsRequest, SidecarReport};

use crate::cluster::{Member, RegistryNode};
use crate::telemetry::sidecars::Sidecars;

/// How long a peer may take to list its sidecars.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// One sidecar as a server reported it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub report: SidecarReport,
    /// The server it reports to.
    pub server: String,
    /// Since its last report reached that server.
    pub age: Duration,
}

/// Every server's sidecars (a sidecar that moved may be listed twice:
/// see [`freshest`]), the servers that did not answer, and the sum of the
/// servers' table generations (changes when any table does).
#[derive(Debug, Default)]
pub struct Tables {
    pub sidecars: Vec<Listed>,
    pub unreachable: Vec<String>,
    pub generation: u64,
}

/// This server's table and every other member's.
pub async fn tables(node: &RegistryNode, local: &Sidecars, own_name: &str) -> Tables {
    let mut tables = Tables {
        sidecars: local
            .local()
            .into_iter()
            .map(|(report, age)| Listed {
                report,
                server: own_name.to_owned(),
                age,
            })
            .collect(),
        unreachable: Vec::new(),
        generation: *local.changes().borrow(),
    };
    let asks = node
        .members()
        .into_iter()
        .filter(|m| m.id != node.id)
        .map(|member| async move {
            let answer = ask(node, &member).await;
            (member, answer)
        });
    for (member, answer) in futures::future::join_all(asks).await {
        let Some(reply) = answer else {
            tables.unreachable.push(member.display_name());
            continue;
        };
        tables.generation = tables.generation.wrapping_add(reply.generation);
        let server = if reply.server.is_empty() {
            member.display_name()
        } else {
            reply.server
        };
        tables
            .sidecars
            .extend(reply.sidecars.into_iter().filter_map(|s| {
                Some(Listed {
                    report: s.report?,
                    server: server.clone(),
                    age: Duration::from_millis(s.age_ms),
                })
            }));
    }
    tables.unreachable.sort();
    tables
}

async fn ask(node: &RegistryNode, member: &Member) -> Option<LocalSidecarsReply> {
    let mut client = node.channels.client(&member.raft_addr).ok()?;
    let request = node.channels.request(LocalSidecarsRequest {});
    let reply = tokio::time::timeout(PEER_TIMEOUT, client.local_sidecars(request)).await;
    node.channels.outcome(&member.raft_addr, reply.is_ok());
    Some(reply.ok()?.ok()?.into_inner())
}

/// The freshest report of each instance.
pub fn freshest(listed: Vec<Listed>) -> Vec<Listed> {
    let mut by_instance: std::collections::HashMap<(String, String), Listed> =
        std::collections::HashMap::new();
    for sidecar in listed {
        let key = (
            sidecar.report.node.clone(),
            sidecar.report.service_id.clone(),
        );
        match by_instance.get(&key) {
            Some(known) if known.age <= sidecar.age => {}
            _ => {
                by_instance.insert(key, sidecar);
            }
        }
    }
    by_instance.into_values().collect()
}

/// The other servers' tables, kept for a second (quota shares are worked
/// out on every quota report; asking the peers each time would cost a
/// round trip per report).
#[derive(Debug, Default)]
pub struct PeerCache {
    last: tokio::sync::Mutex<Option<(Instant, Vec<Listed>)>>,
}

/// How long [`PeerCache`] keeps the peers' tables.
const PEER_CACHE: Duration = Duration::from_secs(1);

impl PeerCache {
    /// The other servers' sidecars, at most a second old (ages as of when
    /// they were asked, plus the time since).
    pub async fn peers(&self, node: &RegistryNode) -> Vec<Listed> {
        self.peers_matching(node, |_| true).await
    }

    /// [`PeerCache::peers`], only the reports `keep` wants (the others are
    /// not copied).
    pub async fn peers_matching(
        &self,
        node: &RegistryNode,
        keep: impl Fn(&SidecarReport) -> bool,
    ) -> Vec<Listed> {
        let mut last = self.last.lock().await;
        if last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= PEER_CACHE)
        {
            let fetched = tables(node, &Sidecars::default(), "").await.sidecars;
            *last = Some((Instant::now(), fetched));
        }
        let Some((at, listed)) = last.as_ref() else {
            return Vec::new();
        };
        let since = at.elapsed();
        listed
            .iter()
            .filter(|l| keep(&l.report))
            .cloned()
            .map(|mut l| {
                l.age += since;
                l
            })
            .collect()
    }
}
