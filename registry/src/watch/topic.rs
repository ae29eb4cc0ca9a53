//! What a watch topic contains, computed from the state, and the changes
//! between two versions of it. Pure: no locks, no I/O.

use std::collections::BTreeMap;

use meshwork_proto::v1::{
    CaRoot, CaRoots, Change, ConfigEntry, Endpoint, Health, KvEntry, ServiceSummary,
    SubscribeRequest, change, subscribe_request,
};

use crate::state::State;
use crate::state::catalog::HealthStatus;

/// A topic subscribers can follow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// The instances of one service, with health.
    Service { name: String, passing_only: bool },
    /// All service names with their tags.
    Services,
    /// The keys under a prefix.
    KvPrefix(String),
    /// The config entries of one kind.
    ConfigEntries(String),
    /// The mesh CA's roots, with what applies when no intention matches
    /// (the `mesh` entry's `DefaultIntention`, else this server's setting,
    /// carried here).
    CaRoots { default_allow: bool },
}

/// The key of the one item of the CA roots topic.
const CA_ROOTS_KEY: &str = "roots";

/// A topic's contents: item key → its current value (as an upsert).
pub type Contents = BTreeMap<String, Change>;

impl Topic {
    /// The topic a request asks for, or why it is invalid;
    /// `default_allow` is this server's default intention.
    pub fn from_request(request: &SubscribeRequest, default_allow: bool) -> Result<Self, String> {
        match &request.topic {
            None => Err(
                "no topic: set one of service, services, kv_prefix, config_entries, ca_roots or leaf"
                    .into(),
            ),
            Some(subscribe_request::Topic::CaRoots(_)) => Ok(Topic::CaRoots { default_allow }),
            // Not state: served by its own stream (`api::grpc::leaf_watch`).
            Some(subscribe_request::Topic::Leaf(_)) => {
                Err("the leaf topic is not a state topic".into())
            }
            Some(subscribe_request::Topic::Service(s)) => {
                if s.name.is_empty() {
                    return Err("service topic without a service name".into());
                }
                Ok(Topic::Service {
                    name: s.name.clone(),
                    passing_only: s.passing_only,
                })
            }
            Some(subscribe_request::Topic::Services(_)) => Ok(Topic::Services),
            Some(subscribe_request::Topic::KvPrefix(k)) => Ok(Topic::KvPrefix(k.prefix.clone())),
            Some(subscribe_request::Topic::ConfigEntries(c)) => {
                crate::state::config::check_kind(&c.kind)?;
                Ok(Topic::ConfigEntries(c.kind.clone()))
            }
        }
    }

    /// The index of the last change to the topic (deletions included).
    pub fn index(&self, state: &State) -> u64 {
        match self {
            Topic::Service { name, .. } => state.catalog.service_index(name),
            Topic::Services => state.catalog.services_list_index(),
            Topic::KvPrefix(prefix) => state.kv.prefix_index(prefix),
            Topic::ConfigEntries(kind) => state.config.kind_index(kind),
            // The trust domain follows the cluster id, set before any root;
            // the mesh entry may set the default intention.
            Topic::CaRoots { .. } => state.ca.index.max(state.config.kind_index("mesh")),
        }
    }

    /// Whether anything the topic covers may have changed after `since`
    /// (a cheap test before computing [`Topic::index`]).
    pub fn may_have_changed(&self, state: &State, since: u64) -> bool {
        match self {
            Topic::KvPrefix(_) => state.kv.last_change() > since,
            _ => true,
        }
    }

    /// The topic's current contents.
    pub fn contents(&self, state: &State) -> Contents {
        match self {
            Topic::Service { name, passing_only } => {
                let catalog = &state.catalog;
                catalog
                    .instances(name)
                    .filter_map(|(node, svc)| {
                        let status = catalog.instance_status(&node.name, &svc.id);
                        if *passing_only && status != HealthStatus::Passing {
                            return None;
                        }
                        let key = format!("{}/{}", node.name, svc.id);
                        let endpoint = Endpoint {
                            key: key.clone(),
                            node: node.name.clone(),
                            node_address: node.address.clone(),
                            service_id: svc.id.clone(),
                            service_name: svc.name.clone(),
                            address: if svc.address.is_empty() {
                                node.address.clone()
                            } else {
                                svc.address.clone()
                            },
                            port: u32::from(svc.port),
                            tags: svc.tags.clone(),
                            meta: svc
                                .meta
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                            weight_passing: svc.weights.passing,
                            weight_warning: svc.weights.warning,
                            health: health(status) as i32,
                            create_index: svc.create_index,
                            modify_index: svc.modify_index,
                        };
                        Some((
                            key,
                            Change {
                                change: Some(change::Change::Endpoint(endpoint)),
                            },
                        ))
                    })
                    .collect()
            }
            Topic::Services => state
                .catalog
                .service_names()
                .into_iter()
                .map(|(name, tags)| {
                    (
                        name.to_owned(),
                        Change {
                            change: Some(change::Change::Service(ServiceSummary {
                                name: name.to_owned(),
                                tags: tags.into_iter().map(str::to_owned).collect(),
                            })),
                        },
                    )
                })
                .collect(),
            Topic::KvPrefix(prefix) => state
                .kv
                .prefix_range(prefix)
                .map(|(key, entry)| {
                    (
                        key.clone(),
                        Change {
                            change: Some(change::Change::Kv(KvEntry {
                                key: key.clone(),
                                value: entry.value.to_vec(),
                                flags: entry.flags,
                                create_index: entry.create_index,
                                modify_index: entry.modify_index,
                            })),
                        },
                    )
                })
                .collect(),
            Topic::ConfigEntries(kind) => state
                .config
                .list(kind)
                .map(|(name, entry)| {
                    let json = crate::state::config::entry_json(kind, name, entry).to_string();
                    (
                        name.clone(),
                        Change {
                            change: Some(change::Change::ConfigEntry(ConfigEntry {
                                kind: kind.clone(),
                                name: name.clone(),
                                json,
                                create_index: entry.create_index,
                                modify_index: entry.modify_index,
                            })),
                        },
                    )
                })
                .collect(),
            Topic::CaRoots { default_allow } => {
                let (Some(cluster_id), Some(_)) = (&state.cluster_id, state.ca.active()) else {
                    return Contents::new();
                };
                let roots = CaRoots {
                    trust_domain: crate::connect::trust_domain(cluster_id),
                    active_root_id: state.ca.active().map(|r| r.id.clone()).unwrap_or_default(),
                    roots: state
                        .ca
                        .roots
                        .iter()
                        .map(|r| CaRoot {
                            id: r.id.clone(),
                            name: r.name.clone(),
                            root_cert_pem: r.root_cert_pem.clone(),
                            intermediate_cert_pems: r.intermediate_cert_pems.clone(),
                            active: r.active,
                            not_after_unix: r.not_after_unix,
                        })
                        .collect(),
                    default_intention: if state.config.default_intention_allow(*default_allow) {
                        "allow"
                    } else {
                        "deny"
                    }
                    .to_owned(),
                    leaf_ttl_secs: state.ca.config.leaf_cert_ttl_secs,
                };
                Contents::from([(
                    CA_ROOTS_KEY.to_owned(),
                    Change {
                        change: Some(change::Change::CaRoots(roots)),
                    },
                )])
            }
        }
    }

    /// The change that says `key` is gone from this topic.
    fn removal(&self, key: &str) -> Change {
        let key = key.to_owned();
        Change {
            change: Some(match self {
                Topic::Service { .. } => change::Change::EndpointRemoved(key),
                Topic::Services => change::Change::ServiceRemoved(key),
                Topic::KvPrefix(_) => change::Change::KvRemoved(key),
                Topic::ConfigEntries(_) => change::Change::ConfigEntryRemoved(key),
                // The CA's roots never go once made (only a restore of an
                // older data dir could): an empty set says so.
                Topic::CaRoots { .. } => change::Change::CaRoots(CaRoots::default()),
            }),
        }
    }

    /// What turns `old` into `new`: upserts of new or changed items, then
    /// removals, each in key order.
    pub fn diff(&self, old: &Contents, new: &Contents) -> Vec<Change> {
        let mut changes: Vec<Change> = new
            .iter()
            .filter(|(key, value)| old.get(*key) != Some(*value))
            .map(|(_, value)| value.clone())
            .collect();
        changes.extend(
            old.keys()
                .filter(|key| !new.contains_key(*key))
                .map(|key| self.removal(key)),
        );
        changes
    }
}

fn health(status: HealthStatus) -> Health {
    match status {
        HealthStatus::Passing => Health::Passing,
        HealthStatus::Warning => Health::Warning,
        HealthStatus::Critical => Health::Critical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;

    fn put(state: &mut State, index: u64, key: &str, value: &str) {
        crate::command::apply(
            state,
            index,
            &Command::KvSet {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                flags: 0,
                cas: None,
            },
        );
    }

    #[test]
    fn kv_prefix_diff_has_upserts_and_removals() {
        let mut state = State::default();
        put(&mut state, 1, "app/a", "1");
        put(&mut state, 2, "app/b", "2");
        put(&mut state, 3, "other", "x");
        let topic = Topic::KvPrefix("app/".into());
        let before = topic.contents(&state);
        assert_eq!(before.len(), 2);
        assert_eq!(topic.index(&state), 2);
        put(&mut state, 4, "app/a", "changed");
        crate::command::apply(
            &mut state,
            5,
            &Command::KvDelete {
                key: "app/b".into(),
                cas: None,
            },
        );
        assert!(topic.may_have_changed(&state, 2));
        assert_eq!(topic.index(&state), 5);
        let after = topic.contents(&state);
        let changes = topic.diff(&before, &after);
        assert_eq!(changes.len(), 2);
        assert!(matches!(
            &changes[0].change,
            Some(change::Change::Kv(e)) if e.key == "app/a" && e.value == b"changed"
        ));
        assert!(matches!(
            &changes[1].change,
            Some(change::Change::KvRemoved(k)) if k == "app/b"
        ));
        assert!(topic.diff(&after, &after).is_empty());
    }

    #[test]
    fn requests_without_a_usable_topic_are_refused() {
        assert!(Topic::from_request(&SubscribeRequest::default(), true).is_err());
        let empty_service = SubscribeRequest {
            topic: Some(subscribe_request::Topic::Service(
                meshwork_proto::v1::ServiceTopic {
                    name: String::new(),
                    passing_only: false,
                },
            )),
            since_index: 0,
        };
        assert!(Topic::from_request(&empty_service, true).is_err());
    }
}
