//! The service catalog: nodes, service instances and health checks, with
//! Consul's semantics. Pure data: probes, timers and HTTP live elsewhere.
//!
//! Besides each object's own `CreateIndex`/`ModifyIndex`, the catalog keeps
//! per-topic change indexes (one per service name, one per node, one for
//! the service list, one for the node list, one for all checks), so that a
//! blocking query wakes only when what it covers changes — including
//! deletions and health changes of the instances it lists.

use std::collections::{BTreeMap, BTreeSet};

use imbl::OrdMap;

use serde::{Deserialize, Serialize};

pub use meshwork_core::health::{CheckDefinition, HealthStatus};

/// The node check that stands for a sidecar's session.
pub const SESSION_CHECK_ID: &str = "meshwork:session";

/// A node of the catalog (a VM or host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub id: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A service's relative weights by health (for DNS SRV and balancing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// One instance of a service on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInstance {
    pub id: String,
    pub name: String,
    /// Consul's service kind: empty for a typical service, else
    /// `ingress-gateway`, `connect-proxy`, ... ([`SERVICE_KINDS`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    pub tags: Vec<String>,
    pub address: String,
    pub port: u16,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A health check, of a node (empty `service_id`) or of a service instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub node: String,
    pub check_id: String,
    pub name: String,
    pub status: HealthStatus,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub definition: CheckDefinition,
    pub create_index: u64,
    pub modify_index: u64,
}

/// The service kinds Consul knows besides a typical service (stored and
/// shown as given; Meshwork's own gateway registers as `ingress-gateway`).
pub const SERVICE_KINDS: [&str; 5] = [
    "connect-proxy",
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
    "api-gateway",
];

/// A service as given in a registration (indexes are assigned on apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub id: String,
    pub name: String,
    /// See [`ServiceInstance::kind`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    pub tags: Vec<String>,
    pub address: String,
    pub port: u16,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
    pub enable_tag_override: bool,
}

/// A check as given in a registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub check_id: String,
    pub name: String,
    pub status: HealthStatus,
    pub notes: String,
    pub output: String,
    /// Empty for a node-level check.
    pub service_id: String,
    pub definition: CheckDefinition,
}

/// A catalog registration: a node, optionally a service, and checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub node: String,
    pub node_id: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub node_meta: BTreeMap<String, String>,
    /// Keep the node's existing fields (Consul's `SkipNodeUpdate`).
    pub skip_node_update: bool,
    pub service: Option<ServiceSpec>,
    pub checks: Vec<CheckSpec>,
}

/// Why a catalog change was refused (the HTTP layer maps these to 4xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CatalogError {
    #[error("Unknown node {0:?}")]
    UnknownNode(String),
    #[error("Unknown service ID {0:?}")]
    UnknownService(String),
    #[error("Unknown check ID {0:?}")]
    UnknownCheck(String),
    #[error("{0}")]
    Invalid(String),
}

/// The catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    nodes: OrdMap<String, Node>,
    /// node → service id → instance.
    services: OrdMap<String, BTreeMap<String, ServiceInstance>>,
    /// node → check id → check.
    checks: OrdMap<String, BTreeMap<String, HealthCheck>>,
    /// service name → index of the last change to any of its instances,
    /// their checks or their nodes' checks (kept after deletion).
    service_index: OrdMap<String, u64>,
    /// node name → index of the last change to the node, its services or checks.
    node_index: OrdMap<String, u64>,
    /// Last change to the set of service names or their tags.
    services_list_index: u64,
    /// Last change to the set of nodes.
    nodes_index: u64,
    /// Last change to any check.
    checks_index: u64,
    /// The highest index of a reaped `service_index`/`node_index` entry
    /// (of a service or node that no longer exists): a name with no entry
    /// reports it, so an index a reader saw never goes backwards.
    #[serde(default)]
    reaped: u64,
}

impl Catalog {
    /// Applies a registration at `index`.
    pub fn register(&mut self, index: u64, reg: &Registration) -> Result<(), CatalogError> {
        if reg.node.is_empty() {
            return Err(CatalogError::Invalid("Must provide node".into()));
        }
        if let Some(svc) = &reg.service
            && svc.name.is_empty()
        {
            return Err(CatalogError::Invalid("Must provide service name".into()));
        }
        for check in &reg.checks {
            let service_id = effective_service_id(check, reg.service.as_ref());
            if !service_id.is_empty() && !self.has_service(&reg.node, service_id) {
                let registering = reg.service.as_ref().is_some_and(|s| s.id == service_id);
                if !registering {
                    return Err(CatalogError::UnknownService(service_id.to_owned()));
                }
            }
        }

        // Node.
        let node_changed = match self.nodes.get_mut(&reg.node) {
            Some(_) if reg.skip_node_update => false,
            Some(node) => {
                let changed = node.address != reg.address
                    || (!reg.node_id.is_empty() && node.id != reg.node_id)
                    || node.tagged_addresses != reg.tagged_addresses
                    || node.meta != reg.node_meta;
                if changed {
                    node.address.clone_from(&reg.address);
                    if !reg.node_id.is_empty() {
                        node.id.clone_from(&reg.node_id);
                    }
                    node.tagged_addresses.clone_from(&reg.tagged_addresses);
                    node.meta.clone_from(&reg.node_meta);
                    node.modify_index = index;
                }
                changed
            }
            None => {
                self.nodes.insert(
                    reg.node.clone(),
                    Node {
                        name: reg.node.clone(),
                        id: reg.node_id.clone(),
                        address: reg.address.clone(),
                        datacenter: reg.datacenter.clone(),
                        tagged_addresses: reg.tagged_addresses.clone(),
                        meta: reg.node_meta.clone(),
                        create_index: index,
                        modify_index: index,
                    },
                );
                self.nodes_index = index;
                true
            }
        };
        if node_changed {
            self.nodes_index = index;
            self.touch_node(index, &reg.node);
            // A service's answers carry its node's address (and meta):
            // every service on the node changed with it.
            let names: Vec<String> = self
                .services
                .get(&reg.node)
                .map(|s| s.values().map(|i| i.name.clone()).collect())
                .unwrap_or_default();
            for name in names {
                self.service_index.insert(name, index);
            }
        }

        // Service.
        if let Some(spec) = &reg.service {
            let id = if spec.id.is_empty() {
                spec.name.clone()
            } else {
                spec.id.clone()
            };
            let instances = self.services.entry(reg.node.clone()).or_default();
            let previous = instances.get(&id).cloned();
            let instance = ServiceInstance {
                id: id.clone(),
                name: spec.name.clone(),
                kind: spec.kind.clone(),
                tags: spec.tags.clone(),
                address: spec.address.clone(),
                port: spec.port,
                meta: spec.meta.clone(),
                weights: spec.weights,
                enable_tag_override: spec.enable_tag_override,
                create_index: previous.as_ref().map_or(index, |p| p.create_index),
                modify_index: index,
            };
            let unchanged = previous.as_ref().is_some_and(|p| {
                let mut same = p.clone();
                same.modify_index = index;
                same == instance
            });
            if !unchanged {
                if let Some(prev) = &previous
                    && prev.name != instance.name
                {
                    self.service_index.insert(prev.name.clone(), index);
                    self.services_list_index = index;
                }
                if previous
                    .as_ref()
                    .is_none_or(|p| p.tags != instance.tags || p.name != instance.name)
                {
                    self.services_list_index = index;
                }
                instances.insert(id.clone(), instance.clone());
                self.service_index.insert(instance.name.clone(), index);
                self.touch_node(index, &reg.node);
                // The instance's checks carry its name and tags.
                if let Some(checks) = self.checks.get_mut(&reg.node) {
                    for check in checks.values_mut().filter(|c| c.service_id == id) {
                        check.service_name.clone_from(&instance.name);
                        check.service_tags.clone_from(&instance.tags);
                    }
                }
            }
        }

        // Checks.
        for spec in &reg.checks {
            let service_id = effective_service_id(spec, reg.service.as_ref()).to_owned();
            let (service_name, service_tags) = self
                .service(&reg.node, &service_id)
                .map(|s| (s.name.clone(), s.tags.clone()))
                .unwrap_or_default();
            let checks = self.checks.entry(reg.node.clone()).or_default();
            let previous = checks.get(&spec.check_id);
            let check = HealthCheck {
                node: reg.node.clone(),
                check_id: spec.check_id.clone(),
                name: spec.name.clone(),
                status: spec.status,
                notes: spec.notes.clone(),
                output: spec.output.clone(),
                service_id,
                service_name,
                service_tags,
                definition: spec.definition.clone(),
                create_index: previous.map_or(index, |p| p.create_index),
                modify_index: index,
            };
            let unchanged = previous.is_some_and(|p| {
                let mut same = p.clone();
                same.modify_index = index;
                same == check
            });
            if !unchanged {
                checks.insert(spec.check_id.clone(), check.clone());
                self.check_changed(index, &check);
            }
        }
        Ok(())
    }

    /// Removes a node (with everything on it), a service instance (with its
    /// checks) or a single check.
    pub fn deregister(
        &mut self,
        index: u64,
        node: &str,
        service_id: Option<&str>,
        check_id: Option<&str>,
    ) -> Result<(), CatalogError> {
        if !self.nodes.contains_key(node) {
            // Consul treats deregistering from an unknown node as done.
            return Ok(());
        }
        match (service_id, check_id) {
            (None, None) => {
                let names: BTreeSet<String> = self
                    .services
                    .remove(node)
                    .unwrap_or_default()
                    .into_values()
                    .map(|s| s.name)
                    .collect();
                if !names.is_empty() {
                    self.services_list_index = index;
                }
                for name in names {
                    self.service_index.insert(name, index);
                }
                if self.checks.remove(node).is_some() {
                    self.checks_index = index;
                }
                self.nodes.remove(node);
                self.nodes_index = index;
                self.node_index.insert(node.to_owned(), index);
            }
            (Some(service_id), _) => {
                let removed = self
                    .services
                    .get_mut(node)
                    .and_then(|s| s.remove(service_id));
                let Some(removed) = removed else {
                    return Err(CatalogError::UnknownService(service_id.to_owned()));
                };
                if let Some(checks) = self.checks.get_mut(node) {
                    let before = checks.len();
                    checks.retain(|_, c| c.service_id != service_id);
                    if checks.len() != before {
                        self.checks_index = index;
                    }
                }
                self.service_index.insert(removed.name, index);
                self.services_list_index = index;
                self.touch_node(index, node);
            }
            (None, Some(check_id)) => {
                let removed = self.checks.get_mut(node).and_then(|c| c.remove(check_id));
                let Some(removed) = removed else {
                    return Err(CatalogError::UnknownCheck(check_id.to_owned()));
                };
                self.check_changed(index, &removed);
            }
        }
        Ok(())
    }

    /// Sets a check's status and output; a no-op when nothing changes.
    pub fn update_check(
        &mut self,
        index: u64,
        node: &str,
        check_id: &str,
        status: HealthStatus,
        output: &str,
    ) -> Result<bool, CatalogError> {
        let check = self
            .checks
            .get_mut(node)
            .and_then(|c| c.get_mut(check_id))
            .ok_or_else(|| CatalogError::UnknownCheck(check_id.to_owned()))?;
        if check.status == status && check.output == output {
            return Ok(false);
        }
        check.status = status;
        output.clone_into(&mut check.output);
        check.modify_index = index;
        let check = check.clone();
        self.check_changed(index, &check);
        Ok(true)
    }

    /// Replaces the whole catalog with `backup` (a restored snapshot), as
    /// one write at `index`: every restored object is stamped with
    /// `index`, and every service and node that existed before or after
    /// counts as changed, so indexes never go backwards and every blocking
    /// query and watch sees the change.
    pub fn restore(&mut self, index: u64, backup: &Catalog) {
        let mut service_index = self.service_index.clone();
        let mut node_index = self.node_index.clone();
        for name in self
            .services
            .values()
            .chain(backup.services.values())
            .flat_map(|s| s.values())
            .map(|s| &s.name)
        {
            service_index.insert(name.clone(), index);
        }
        for name in self.nodes.keys().chain(backup.nodes.keys()) {
            node_index.insert(name.clone(), index);
        }
        let mut restored = backup.clone();
        restored.nodes = backup
            .nodes
            .iter()
            .map(|(name, node)| {
                let mut node = node.clone();
                node.create_index = index;
                node.modify_index = index;
                (name.clone(), node)
            })
            .collect();
        restored.services = backup
            .services
            .iter()
            .map(|(node, instances)| {
                let mut instances = instances.clone();
                for instance in instances.values_mut() {
                    instance.create_index = index;
                    instance.modify_index = index;
                }
                (node.clone(), instances)
            })
            .collect();
        restored.checks = backup
            .checks
            .iter()
            .map(|(node, checks)| {
                let mut checks = checks.clone();
                for check in checks.values_mut() {
                    check.create_index = index;
                    check.modify_index = index;
                }
                (node.clone(), checks)
            })
            .collect();
        restored.service_index = service_index;
        restored.node_index = node_index;
        restored.services_list_index = index;
        restored.nodes_index = index;
        restored.checks_index = index;
        // Ours, not the backup's: an index from another cluster's history
        // could be ahead of this one's log.
        restored.reaped = self.reaped;
        *self = restored;
    }

    fn check_changed(&mut self, index: u64, check: &HealthCheck) {
        self.checks_index = index;
        self.touch_node(index, &check.node);
        if check.service_id.is_empty() {
            // A node check affects the health of every service on the node.
            let names: Vec<String> = self
                .services
                .get(&check.node)
                .map(|s| s.values().map(|i| i.name.clone()).collect())
                .unwrap_or_default();
            for name in names {
                self.service_index.insert(name, index);
            }
        } else if let Some(name) = self
            .service(&check.node, &check.service_id)
            .map(|s| s.name.clone())
        {
            self.service_index.insert(name, index);
        }
    }

    fn touch_node(&mut self, index: u64, node: &str) {
        self.node_index.insert(node.to_owned(), index);
    }

    fn has_service(&self, node: &str, id: &str) -> bool {
        self.service(node, id).is_some()
    }

    // ---- reads ----

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn service(&self, node: &str, id: &str) -> Option<&ServiceInstance> {
        self.services.get(node).and_then(|s| s.get(id))
    }

    /// Services on one node.
    pub fn node_services(&self, node: &str) -> impl Iterator<Item = &ServiceInstance> {
        self.services.get(node).into_iter().flat_map(|s| s.values())
    }

    /// Every instance of `name`, with its node, in node order.
    pub fn instances<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a Node, &'a ServiceInstance)> + 'a {
        self.services.iter().flat_map(move |(node, svcs)| {
            let node = self.nodes.get(node);
            svcs.values()
                .filter(move |s| s.name == name)
                .filter_map(move |s| node.map(|n| (n, s)))
        })
    }

    /// Service name → sorted, de-duplicated tags.
    pub fn service_names(&self) -> BTreeMap<&str, BTreeSet<&str>> {
        let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for svc in self.services.values().flat_map(|s| s.values()) {
            out.entry(svc.name.as_str())
                .or_default()
                .extend(svc.tags.iter().map(String::as_str));
        }
        out
    }

    /// Checks on a node.
    pub fn node_checks(&self, node: &str) -> impl Iterator<Item = &HealthCheck> {
        self.checks.get(node).into_iter().flat_map(|c| c.values())
    }

    /// Every check, in node then check-id order.
    pub fn all_checks(&self) -> impl Iterator<Item = &HealthCheck> {
        self.checks.values().flat_map(|c| c.values())
    }

    /// The checks that decide an instance's health: its own and its node's.
    pub fn instance_checks<'a>(
        &'a self,
        node: &'a str,
        service_id: &'a str,
    ) -> impl Iterator<Item = &'a HealthCheck> + 'a {
        self.node_checks(node)
            .filter(move |c| c.service_id.is_empty() || c.service_id == service_id)
    }

    /// An instance's aggregate status: the worst of its checks (passing
    /// when it has none).
    pub fn instance_status(&self, node: &str, service_id: &str) -> HealthStatus {
        self.instance_checks(node, service_id)
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Passing)
    }

    pub fn service_index(&self, name: &str) -> u64 {
        self.service_index.get(name).copied().unwrap_or(self.reaped)
    }

    pub fn node_index(&self, node: &str) -> u64 {
        self.node_index.get(node).copied().unwrap_or(self.reaped)
    }

    /// Index entries of services and nodes that no longer exist, last
    /// changed at or below `up_to`.
    fn reapable_entries(&self, up_to: u64) -> (Vec<Named>, Vec<Named>) {
        let live: std::collections::HashSet<&str> = self
            .services
            .values()
            .flat_map(|s| s.values())
            .map(|s| s.name.as_str())
            .collect();
        let services = self
            .service_index
            .iter()
            .filter(|(name, i)| **i <= up_to && !live.contains(name.as_str()))
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        let nodes = self
            .node_index
            .iter()
            .filter(|(name, i)| **i <= up_to && !self.nodes.contains_key(*name))
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        (services, nodes)
    }

    /// Some entry [`Catalog::reap`] would drop.
    pub fn reapable(&self, up_to: u64) -> bool {
        let (services, nodes) = self.reapable_entries(up_to);
        !services.is_empty() || !nodes.is_empty()
    }

    /// Forgets the indexes of services and nodes gone since `up_to` or
    /// before (the catalog's tombstones); how many.
    pub fn reap(&mut self, up_to: u64) -> usize {
        let (services, nodes) = self.reapable_entries(up_to);
        for (name, index) in &services {
            self.service_index.remove(name);
            self.reaped = self.reaped.max(*index);
        }
        for (name, index) in &nodes {
            self.node_index.remove(name);
            self.reaped = self.reaped.max(*index);
        }
        services.len() + nodes.len()
    }

    pub fn services_list_index(&self) -> u64 {
        self.services_list_index
    }

    pub fn nodes_index(&self) -> u64 {
        self.nodes_index
    }

    pub fn checks_index(&self) -> u64 {
        self.checks_index
    }

    /// An index that moves with any change of services, instances, nodes
    /// or checks (the UI's service summary).
    pub fn catalog_index(&self) -> u64 {
        self.service_index
            .values()
            .copied()
            .chain([
                self.services_list_index,
                self.checks_index,
                self.nodes_index,
                self.reaped,
            ])
            .max()
            .unwrap_or(0)
    }
}

/// A name and its index.
type Named = (String, u64);

fn effective_service_id<'a>(check: &'a CheckSpec, service: Option<&'a ServiceSpec>) -> &'a str {
    if check.service_id.is_empty() {
        ""
    } else if let Some(svc) = service
        && (check.service_id == svc.name && svc.id.is_empty())
    {
        &svc.name
    } else {
        &check.service_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(node: &str, svc: Option<(&str, &str)>, checks: Vec<CheckSpec>) -> Registration {
        Registration {
            node: node.into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            service: svc.map(|(id, name)| ServiceSpec {
                id: id.into(),
                name: name.into(),
                port: 80,
                tags: vec!["v1".into()],
                ..ServiceSpec::default()
            }),
            checks,
            ..Registration::default()
        }
    }

    fn check(id: &str, service_id: &str, status: HealthStatus) -> CheckSpec {
        CheckSpec {
            check_id: id.into(),
            name: id.into(),
            status,
            service_id: service_id.into(),
            ..CheckSpec::default()
        }
    }

    #[test]
    fn register_and_query_instances() {
        let mut c = Catalog::default();
        c.register(
            5,
            &reg(
                "n1",
                Some(("web-1", "web")),
                vec![check("c1", "web-1", HealthStatus::Passing)],
            ),
        )
        .expect("register");
        c.register(6, &reg("n2", Some(("web-2", "web")), vec![]))
            .expect("register");
        let ids: Vec<_> = c
            .instances("web")
            .map(|(n, s)| (n.name.as_str(), s.id.as_str()))
            .collect();
        assert_eq!(ids, [("n1", "web-1"), ("n2", "web-2")]);
        assert_eq!(c.service_index("web"), 6);
        assert_eq!(c.instance_status("n1", "web-1"), HealthStatus::Passing);
        assert_eq!(
            c.service_names()["web"].iter().copied().collect::<Vec<_>>(),
            ["v1"]
        );
    }

    #[test]
    fn gone_services_and_nodes_are_reaped_without_an_index_going_back() {
        let mut c = Catalog::default();
        c.register(5, &reg("n1", Some(("web-1", "web")), vec![]))
            .expect("register");
        c.register(6, &reg("n2", Some(("db-1", "db")), vec![]))
            .expect("register");
        c.deregister(7, "n2", None, None).expect("node gone");
        assert_eq!(c.service_index("db"), 7);
        assert!(!c.reapable(6), "nothing gone at or below 6");
        assert!(c.reapable(7));
        assert_eq!(c.reap(7), 2, "db's and n2's index entries");
        assert!(!c.reapable(100), "live web and n1 are kept");
        assert_eq!(c.service_index("db"), 7, "never below what was seen");
        assert_eq!(c.node_index("n2"), 7);
        assert_eq!(c.service_index("web"), 5, "live entries are exact");
        c.register(9, &reg("n2", Some(("db-2", "db")), vec![]))
            .expect("back");
        assert_eq!(c.service_index("db"), 9);
    }

    #[test]
    fn unchanged_registration_does_not_bump_indexes() {
        let mut c = Catalog::default();
        let r = reg(
            "n1",
            Some(("web-1", "web")),
            vec![check("c1", "web-1", HealthStatus::Passing)],
        );
        c.register(5, &r).expect("register");
        c.register(9, &r).expect("register again");
        assert_eq!(c.service_index("web"), 5);
        assert_eq!(c.service("n1", "web-1").map(|s| s.modify_index), Some(5));
    }

    #[test]
    fn health_changes_bump_only_the_affected_service() {
        let mut c = Catalog::default();
        c.register(
            5,
            &reg(
                "n1",
                Some(("web-1", "web")),
                vec![check("c1", "web-1", HealthStatus::Passing)],
            ),
        )
        .expect("register");
        c.register(6, &reg("n1", Some(("db-1", "db")), vec![]))
            .expect("register");
        assert!(
            c.update_check(7, "n1", "c1", HealthStatus::Critical, "down")
                .expect("update")
        );
        assert!(
            !c.update_check(8, "n1", "c1", HealthStatus::Critical, "down")
                .expect("same")
        );
        assert_eq!(c.service_index("web"), 7);
        assert_eq!(c.service_index("db"), 6);
        // A node check affects every service on the node.
        c.register(
            9,
            &reg(
                "n1",
                None,
                vec![check("serfHealth", "", HealthStatus::Warning)],
            ),
        )
        .expect("node check");
        assert_eq!(c.service_index("db"), 9);
        assert_eq!(c.instance_status("n1", "db-1"), HealthStatus::Warning);
        assert_eq!(
            c.update_check(10, "n1", "nope", HealthStatus::Passing, ""),
            Err(CatalogError::UnknownCheck("nope".into()))
        );
    }

    #[test]
    fn deregistration_removes_checks_and_bumps_indexes() {
        let mut c = Catalog::default();
        c.register(
            5,
            &reg(
                "n1",
                Some(("web-1", "web")),
                vec![check("c1", "web-1", HealthStatus::Passing)],
            ),
        )
        .expect("register");
        c.deregister(8, "n1", Some("web-1"), None)
            .expect("deregister");
        assert_eq!(c.instances("web").count(), 0);
        assert_eq!(c.node_checks("n1").count(), 0);
        assert_eq!(c.service_index("web"), 8);
        assert_eq!(
            c.deregister(9, "n1", Some("web-1"), None),
            Err(CatalogError::UnknownService("web-1".into()))
        );
        c.deregister(10, "n1", None, None).expect("node");
        assert!(c.node("n1").is_none());
        assert_eq!(c.nodes_index(), 10);
    }

    #[test]
    fn a_check_for_an_unknown_service_is_refused() {
        let mut c = Catalog::default();
        let err = c
            .register(
                5,
                &reg(
                    "n1",
                    None,
                    vec![check("c1", "ghost", HealthStatus::Passing)],
                ),
            )
            .expect_err("unknown service");
        assert_eq!(err, CatalogError::UnknownService("ghost".into()));
    }
}
