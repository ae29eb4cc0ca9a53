//! `meshwork.v1.Agent`: what sidecars call to register the service they
//! front, report its checks and renew their session.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use meshwork_proto::v1::agent_server::Agent;
use meshwork_proto::v1::{
    AgentReply, CheckStatus, DeregisterRequest, HeartbeatReply, HeartbeatRequest, RegisterReply,
    RegisterRequest, ReportAppliedReply, SidecarReport, SignLeafReply, SignLeafRequest,
    UpdateCheckRequest,
};
use tonic::{Request, Response, Status};

use crate::auth::{Kind, Need, Resolved};
use crate::cluster::{ClusterError, Consistency, RegistryNode};
use crate::command::{Command, CommandResponse};
use crate::leader::liveness::{DEFAULT_SESSION_TTL, SESSION_CHECK_ID, Sessions};
use crate::state::catalog::{
    CatalogError, CheckDefinition, CheckSpec, HealthStatus, Registration, ServiceSpec, Weights,
};

/// Shortest session TTL accepted.
const MIN_SESSION_TTL: Duration = Duration::from_millis(500);

/// Serves `meshwork.v1.Agent`.
#[derive(Clone)]
pub struct AgentService {
    pub node: Arc<RegistryNode>,
    pub sessions: Sessions,
    pub resolver: super::Resolver,
    /// The ACL settings the resolver applies (whether a write must catch
    /// up first: [`crate::api::catch_up_for_write`]).
    pub acl: Arc<crate::auth::Acl>,
    /// In the SPIFFE IDs of the leaves signed here.
    pub datacenter: Arc<str>,
    /// Off: SignLeaf answers FAILED_PRECONDITION.
    pub connect_enabled: bool,
    /// What the sidecars connected here have applied.
    pub sidecars: Arc<crate::telemetry::sidecars::Sidecars>,
    /// The other servers' sidecars, for quota shares.
    pub peers: Arc<crate::api::fleet::PeerCache>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService").finish_non_exhaustive()
    }
}

fn cluster_status(e: ClusterError) -> Status {
    match e {
        ClusterError::NoLeader => Status::unavailable("No cluster leader"),
        ClusterError::OutcomeUnknown(m) => {
            Status::unavailable(format!("write outcome unknown: {m}"))
        }
        ClusterError::Rejected(m) => Status::invalid_argument(m),
        ClusterError::Internal(m) => Status::internal(m),
    }
}

/// A registration's service kind: empty (typical) or one of Consul's.
fn service_kind(kind: &str) -> Result<String, Status> {
    match kind {
        "" | "typical" => Ok(String::new()),
        k if crate::state::catalog::SERVICE_KINDS.contains(&k) => Ok(k.to_owned()),
        k => Err(Status::invalid_argument(format!(
            "invalid service kind {k:?} (one of typical, {})",
            crate::state::catalog::SERVICE_KINDS.join(", ")
        ))),
    }
}

fn health(status: i32, what: &str) -> Result<HealthStatus, Status> {
    match CheckStatus::try_from(status) {
        Ok(CheckStatus::CheckPassing) => Ok(HealthStatus::Passing),
        Ok(CheckStatus::CheckWarning) => Ok(HealthStatus::Warning),
        // Consul's default for a new check.
        Ok(CheckStatus::CheckCritical | CheckStatus::Unspecified) => Ok(HealthStatus::Critical),
        Err(_) => Err(Status::invalid_argument(format!(
            "{what}: unknown check status {status}"
        ))),
    }
}

/// A name that is there and printable: control characters (CR, LF, NUL,
/// …) would end up in DNS answers, logs and headers.
fn non_empty(value: &str, what: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "{what} must not be empty"
        )));
    }
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(Status::invalid_argument(format!(
            "{what} {value:?} contains the control character {c:?}"
        ))),
        None => Ok(()),
    }
}

/// Bounds of a `SidecarReport` (a sidecar follows a handful of kinds and
/// refuses few entries; anything bigger is not a sidecar's report).
/// (At most about 20 KiB a sidecar: a server holds up to 50,000.)
const MAX_REPORTED_KINDS: usize = 64;
const MAX_REFUSED: usize = 16;
const MAX_REPORT_TEXT: usize = 1024;

/// Checks a report's sizes and text; `Err` says what is wrong.
fn vet_report(report: &SidecarReport) -> Result<(), Status> {
    non_empty(&report.node, "node")?;
    non_empty(&report.service_id, "service_id")?;
    if report.applied.len() > MAX_REPORTED_KINDS || report.refused.len() > MAX_REFUSED {
        return Err(Status::invalid_argument(format!(
            "a report names at most {MAX_REPORTED_KINDS} kinds and {MAX_REFUSED} refused entries"
        )));
    }
    let texts = [&report.version, &report.mode, &report.config_digest]
        .into_iter()
        .chain(report.applied.keys())
        .chain(report.refused.iter().flat_map(|r| [&r.scope, &r.reason]));
    for text in texts {
        if text.len() > MAX_REPORT_TEXT {
            return Err(Status::invalid_argument(format!(
                "report text longer than {MAX_REPORT_TEXT} bytes"
            )));
        }
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return Err(Status::invalid_argument(
                "report text contains control characters",
            ));
        }
    }
    Ok(())
}

/// Instances whose last quota report is older than this are not given a
/// share (they report every 2 s while a quota applies).
const QUOTA_FRESH: Duration = Duration::from_secs(6);

impl AgentService {
    /// `report`'s share of its service's cluster-wide quota: the quota
    /// (from the service's `service-defaults`, as this server has it)
    /// shared out among the instances that report enforcing it, on any
    /// server, by the demand each reported (`quota_shares`). `None` when
    /// the service has no quota (the sidecar keeps what it has until its
    /// own copy of the entry catches up).
    async fn quota_share(&self, node: &str, service_id: &str, service: &str) -> Option<f64> {
        let quota = {
            let state = self.node.state.read();
            let entry = state.config.get("service-defaults", service)?;
            meshwork_core::ratelimit::RateLimits::from_service_defaults(service, &entry.body)
                .ok()??
                .service_quota()?
        };
        // Only the service's instances that enforce a quota are copied
        // (a server may hold tens of thousands of reports).
        let wanted = |r: &SidecarReport| r.quota && r.service == service;
        let mut listed: Vec<crate::api::fleet::Listed> = self
            .sidecars
            .local_matching(wanted)
            .into_iter()
            .map(|(report, age)| crate::api::fleet::Listed {
                report,
                server: String::new(),
                age,
            })
            .collect();
        listed.extend(self.peers.peers_matching(&self.node, wanted).await);
        let instances: Vec<_> = crate::api::fleet::freshest(listed)
            .into_iter()
            .filter(|l| l.report.quota && l.report.service == service && l.age < QUOTA_FRESH)
            .collect();
        let demands: Vec<f64> = instances
            .iter()
            .map(|l| l.report.quota_demand_rps)
            .collect();
        let mine = instances
            .iter()
            .position(|l| l.report.node == node && l.report.service_id == service_id)?;
        meshwork_core::ratelimit::quota_shares(quota, &demands)
            .get(mine)
            .copied()
    }

    /// The rights of the call's token.
    fn authorize<T>(&self, request: &Request<T>) -> Result<Resolved, Status> {
        (self.resolver)(super::call_token(request.metadata().as_ref()))
            .map_err(super::refusal_status)
    }

    /// The rights of the token of a call that writes or signs a leaf, as
    /// of the leader's state ([`crate::api::catch_up_for_write`]).
    async fn authorize_write<T>(&self, request: &Request<T>) -> Result<Resolved, Status> {
        crate::api::catch_up_for_write(&self.acl, &self.node)
            .await
            .map_err(cluster_status)?;
        self.authorize(request)
    }

    /// A sidecar may register its service with the service's write (a
    /// service identity token): the node comes with it, unless the node
    /// exists under another address, which takes the node's write (no
    /// service token moves another machine's node).
    fn vet_registration(
        &self,
        authz: &Resolved,
        registration: &Registration,
    ) -> Result<(), Status> {
        let deny = super::refusal_status;
        if let Some(service) = &registration.service {
            authz
                .require(Kind::Service, &service.name, Need::Write)
                .map_err(deny)?;
        }
        let state = self.node.state.read();
        if let Some(service) = &registration.service
            && let Some(old) = state.catalog.service(&registration.node, &service.id)
            && old.name != service.name
        {
            authz
                .require(Kind::Service, &old.name, Need::Write)
                .map_err(deny)?;
        }
        // A node that exists is someone's: a sidecar may register onto it
        // only if it may write every service already there (its own
        // earlier registration); otherwise — another machine's node, or
        // one moved to another address — it takes the node's write.
        let takes_over = state.catalog.node(&registration.node).is_some_and(|n| {
            n.address != registration.address
                || state
                    .catalog
                    .node_services(&registration.node)
                    .any(|s| !authz.allows(Kind::Service, &s.name, Need::Write))
        });
        if takes_over {
            authz
                .require(Kind::Node, &registration.node, Need::Write)
                .map_err(deny)?;
        }
        Ok(())
    }

    /// The write a change to `service_id` on `node` needs (its service's;
    /// the node's when it is not there).
    fn require_instance_write(
        &self,
        authz: &Resolved,
        node: &str,
        service_id: &str,
    ) -> Result<(), Status> {
        let name = self
            .node
            .state
            .read()
            .catalog
            .service(node, service_id)
            .map(|s| s.name.clone());
        match name {
            Some(name) => authz.require(Kind::Service, &name, Need::Write),
            None => authz.require(Kind::Node, node, Need::Write),
        }
        .map_err(super::refusal_status)
    }

    async fn write(&self, command: Command) -> Result<u64, Status> {
        let applied = self.node.write(command).await.map_err(cluster_status)?;
        match applied.response {
            CommandResponse::CatalogRejected(e) => Err(match e {
                CatalogError::Invalid(m) => Status::invalid_argument(m),
                other => Status::not_found(other.to_string()),
            }),
            _ => Ok(applied.index),
        }
    }

    fn registration(request: RegisterRequest) -> Result<(Registration, Duration), Status> {
        non_empty(&request.node, "node")?;
        non_empty(&request.node_address, "node_address")?;
        let service = request
            .service
            .ok_or_else(|| Status::invalid_argument("service is required"))?;
        non_empty(&service.name, "service.name")?;
        let id = if service.id.is_empty() {
            service.name.clone()
        } else {
            non_empty(&service.id, "service.id")?;
            service.id.clone()
        };
        let port = u16::try_from(service.port).map_err(|_| {
            Status::invalid_argument(format!("service.port {} is above 65535", service.port))
        })?;
        let session_ttl = match request.session_ttl_ms {
            0 => DEFAULT_SESSION_TTL,
            ms => Duration::from_millis(ms),
        };
        if session_ttl < MIN_SESSION_TTL {
            return Err(Status::invalid_argument(format!(
                "session_ttl_ms must be at least {}",
                MIN_SESSION_TTL.as_millis()
            )));
        }
        let mut seen = HashSet::new();
        let mut checks = Vec::with_capacity(request.checks.len() + 1);
        for check in request.checks {
            non_empty(&check.check_id, "checks[].check_id")?;
            if check.check_id == SESSION_CHECK_ID || !seen.insert(check.check_id.clone()) {
                return Err(Status::invalid_argument(format!(
                    "check id {:?} is reserved or given twice",
                    check.check_id
                )));
            }
            checks.push(CheckSpec {
                name: if check.name.is_empty() {
                    format!("Service '{}' check", service.name)
                } else {
                    check.name
                },
                status: health(check.status, &check.check_id)?,
                notes: String::new(),
                output: check.output,
                service_id: id.clone(),
                definition: CheckDefinition {
                    sidecar: Some(check.target),
                    interval_ms: (check.interval_ms > 0).then_some(check.interval_ms),
                    deregister_critical_after_ms: (check.deregister_critical_after_ms > 0)
                        .then_some(check.deregister_critical_after_ms),
                    ..CheckDefinition::default()
                },
                check_id: check.check_id,
            });
        }
        checks.push(CheckSpec {
            check_id: SESSION_CHECK_ID.into(),
            name: "Sidecar session".into(),
            status: HealthStatus::Passing,
            notes: "critical when the sidecar sends no heartbeat within the session TTL".into(),
            output: "session started".into(),
            service_id: String::new(),
            definition: CheckDefinition {
                session_ttl_ms: Some(session_ttl.as_millis() as u64),
                deregister_critical_after_ms: (request.deregister_critical_after_ms > 0)
                    .then_some(request.deregister_critical_after_ms),
                ..CheckDefinition::default()
            },
        });
        let registration = Registration {
            node: request.node,
            address: request.node_address,
            node_meta: request.node_meta.into_iter().collect::<BTreeMap<_, _>>(),
            service: Some(ServiceSpec {
                id,
                kind: service_kind(&service.kind)?,
                name: service.name,
                tags: service.tags,
                address: service.address,
                port,
                meta: service.meta.into_iter().collect(),
                weights: Weights {
                    passing: if service.weight_passing == 0 {
                        Weights::default().passing
                    } else {
                        service.weight_passing
                    },
                    warning: if service.weight_warning == 0 {
                        Weights::default().warning
                    } else {
                        service.weight_warning
                    },
                },
                enable_tag_override: false,
            }),
            checks,
            ..Registration::default()
        };
        Ok((registration, session_ttl))
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn sign_leaf(
        &self,
        request: Request<SignLeafRequest>,
    ) -> Result<Response<SignLeafReply>, Status> {
        use crate::connect::sign::SignError;
        let authz = self.authorize_write(&request).await?;
        let request = request.into_inner();
        if !self.connect_enabled {
            return Err(Status::failed_precondition(
                "the mesh CA is off on this server (connect.enabled = false)",
            ));
        }
        crate::connect::valid_service_name(&request.service).map_err(Status::invalid_argument)?;
        authz
            .require(Kind::Service, &request.service, Need::Write)
            .map_err(super::refusal_status)?;
        let (leaf, index) = self
            .node
            .sign_leaf(crate::connect::sign::LeafRequest {
                datacenter: &self.datacenter,
                service: &request.service,
                csr_pem: &request.csr_pem,
            })
            .await
            .map_err(|e| match e {
                SignError::Cluster(e) => cluster_status(e),
                SignError::Ca(e) => super::ca_status(e),
            })?;
        Ok(Response::new(SignLeafReply {
            cert_chain_pem: leaf.chain_pem,
            spiffe_id: leaf.spiffe_id,
            serial: leaf.serial,
            valid_after_unix: leaf.valid_after_unix,
            valid_before_unix: leaf.valid_before_unix,
            root_id: leaf.root_id,
            index,
        }))
    }

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let authz = self.authorize_write(&request).await?;
        let (registration, ttl) = Self::registration(request.into_inner())?;
        self.vet_registration(&authz, &registration)?;
        let node = registration.node.clone();
        // Checks this instance had before but no longer declares (the
        // sidecar's config changed) go in the same log entry.
        let stale: Vec<Command> = {
            let state = self.node.state.read();
            let service_id = registration
                .service
                .as_ref()
                .map(|s| s.id.as_str())
                .unwrap_or_default();
            state
                .catalog
                .node_checks(&node)
                .filter(|c| c.service_id == service_id)
                .filter(|c| !registration.checks.iter().any(|n| n.check_id == c.check_id))
                .map(|c| Command::CatalogDeregister {
                    node: node.clone(),
                    service_id: None,
                    check_id: Some(c.check_id.clone()),
                })
                .collect()
        };
        let register = Command::CatalogRegister(Box::new(registration));
        let index = if stale.is_empty() {
            self.write(register).await?
        } else {
            let mut batch = stale;
            batch.push(register);
            let applied = self
                .node
                .write(Command::Batch(batch))
                .await
                .map_err(cluster_status)?;
            // Only the registration's own answer matters (a stale check
            // that is already gone is fine).
            if let CommandResponse::Batch(responses) = &applied.response
                && let Some(CommandResponse::CatalogRejected(e)) = responses.last()
            {
                return Err(Status::invalid_argument(e.to_string()));
            }
            applied.index
        };
        self.sessions.touch(&node);
        Ok(Response::new(RegisterReply {
            index,
            session_ttl_ms: ttl.as_millis() as u64,
        }))
    }

    async fn update_check(
        &self,
        request: Request<UpdateCheckRequest>,
    ) -> Result<Response<AgentReply>, Status> {
        let authz = self.authorize_write(&request).await?;
        let request = request.into_inner();
        non_empty(&request.node, "node")?;
        non_empty(&request.check_id, "check_id")?;
        let owner = self
            .node
            .state
            .read()
            .catalog
            .node_checks(&request.node)
            .find(|c| c.check_id == request.check_id && !c.service_id.is_empty())
            .map(|c| c.service_id.clone());
        match owner {
            Some(service_id) => self.require_instance_write(&authz, &request.node, &service_id)?,
            None => authz
                .require(Kind::Node, &request.node, Need::Write)
                .map_err(super::refusal_status)?,
        }
        if request.check_id == SESSION_CHECK_ID {
            return Err(Status::invalid_argument(
                "the session check is renewed with Heartbeat, not updated",
            ));
        }
        let status = health(request.status, &request.check_id)?;
        let index = self
            .write(Command::CheckUpdate {
                node: request.node,
                check_id: request.check_id,
                status,
                output: request.output,
            })
            .await?;
        Ok(Response::new(AgentReply { index }))
    }

    async fn report_applied(
        &self,
        request: Request<SidecarReport>,
    ) -> Result<Response<ReportAppliedReply>, Status> {
        let authz = self.authorize_write(&request).await?;
        let mut report = request.into_inner();
        vet_report(&report)?;
        // Listed as what the catalog has: the service's name and address
        // come from its registration, not from the report.
        let instance = {
            let state = self.node.state.read();
            state
                .catalog
                .service(&report.node, &report.service_id)
                .map(|s| {
                    let host = if s.address.is_empty() {
                        state
                            .catalog
                            .node(&report.node)
                            .map(|n| n.address.clone())
                            .unwrap_or_default()
                    } else {
                        s.address.clone()
                    };
                    (s.name.clone(), format!("{host}:{}", s.port))
                })
        };
        let Some((name, address)) = instance else {
            return Err(Status::failed_precondition(format!(
                "no instance {:?} on node {:?}: register it first",
                report.service_id, report.node
            )));
        };
        self.require_instance_write(&authz, &report.node, &report.service_id)?;
        report.service = name;
        report.address = address;
        if !report.quota_demand_rps.is_finite() || report.quota_demand_rps < 0.0 {
            return Err(Status::invalid_argument(
                "quota_demand_rps must be a number from 0",
            ));
        }
        // What the quota share needs of it, kept before the report goes
        // into the table.
        let quota = report.quota.then(|| {
            (
                report.node.clone(),
                report.service_id.clone(),
                report.service.clone(),
            )
        });
        self.sidecars
            .record(report)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let quota_share_rps = match quota {
            Some((node, service_id, service)) => {
                self.quota_share(&node, &service_id, &service).await
            }
            None => None,
        };
        Ok(Response::new(ReportAppliedReply {
            index: self.node.state.applied_index(),
            quota_share_rps,
        }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<AgentReply>, Status> {
        let authz = self.authorize_write(&request).await?;
        let request = request.into_inner();
        non_empty(&request.node, "node")?;
        non_empty(&request.service_id, "service_id")?;
        self.require_instance_write(&authz, &request.node, &request.service_id)?;
        self.sidecars.remove(&request.node, &request.service_id);
        let mut index = self
            .write(Command::CatalogDeregister {
                node: request.node.clone(),
                service_id: Some(request.service_id),
                check_id: None,
            })
            .await?;
        // The sidecar's node goes too once nothing else runs on it.
        let empty = self
            .node
            .state
            .read()
            .catalog
            .node_services(&request.node)
            .next()
            .is_none();
        if empty {
            index = self
                .write(Command::CatalogDeregister {
                    node: request.node,
                    service_id: None,
                    check_id: None,
                })
                .await?;
        }
        Ok(Response::new(AgentReply { index }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let authz = self.authorize_write(&request).await?;
        let request = request.into_inner();
        non_empty(&request.node, "node")?;
        // Renewing a node's liveness is a write to what runs on it. An
        // instance this server does not know (yet) renews nothing: the
        // answer only tells the sidecar to register.
        let known = !request.service_id.is_empty()
            && self
                .node
                .state
                .read()
                .catalog
                .service(&request.node, &request.service_id)
                .is_some();
        if known {
            self.require_instance_write(&authz, &request.node, &request.service_id)?;
            self.sessions.touch(&request.node);
        } else if request.service_id.is_empty() {
            authz
                .require(Kind::Node, &request.node, Need::Write)
                .map_err(super::refusal_status)?;
            self.sessions.touch(&request.node);
        }
        let lookup = |node: &RegistryNode| {
            let state = node.state.read();
            let registered = request.service_id.is_empty()
                || state
                    .catalog
                    .service(&request.node, &request.service_id)
                    .is_some();
            let ttl = state
                .catalog
                .node_checks(&request.node)
                .find(|c| c.check_id == SESSION_CHECK_ID)
                .and_then(|c| c.definition.session_ttl_ms);
            (registered && ttl.is_some(), ttl)
        };
        let (mut registered, mut ttl) = lookup(&self.node);
        if !registered {
            // This server may lag behind a fresh registration: look again
            // at the leader's index before telling the sidecar to register.
            self.node
                .read_barrier(Consistency::Default)
                .await
                .map_err(cluster_status)?;
            (registered, ttl) = lookup(&self.node);
        }
        Ok(Response::new(HeartbeatReply {
            registered,
            session_ttl_ms: ttl.unwrap_or(DEFAULT_SESSION_TTL.as_millis() as u64),
        }))
    }
}
