//! ACLs: which token a request carries, what that token may do, and the
//! one place every permission is decided. Resolution reads this server's
//! replica of the ACL tables and is cached per secret until those tables
//! change (their index moves), so a revoked token stops working on a
//! server as soon as the revocation is applied there.

pub mod authorizer;
pub mod rules;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

pub use authorizer::{Authorizer, Fallback};
pub use rules::{Access, Kind, Need, Single};

use crate::state::acl::{
    ANONYMOUS_ACCESSOR, ANONYMOUS_SECRET, AclStore, NodeIdentity, ServiceIdentity, Token,
};

/// What a server does with tokens when it has lost its leader (Consul's
/// `acl.down_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DownPolicy {
    /// Keep answering from this server's replica of the tables.
    #[default]
    ExtendCache,
    /// The same here: resolution never waits on the leader.
    AsyncCache,
    /// Allow everything the default `allow` policy would.
    Allow,
    /// Refuse every request that needs a permission.
    Deny,
}

impl DownPolicy {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "extend-cache" => DownPolicy::ExtendCache,
            "async-cache" => DownPolicy::AsyncCache,
            "allow" => DownPolicy::Allow,
            "deny" => DownPolicy::Deny,
            _ => return None,
        })
    }
}

/// A token's SecretID held in memory: its `Debug` (config dumps, logs)
/// shows no secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<hidden>\"")
    }
}

/// The ACL settings of a server.
#[derive(Debug, Clone)]
pub struct AclSettings {
    pub enabled: bool,
    pub default_policy: Fallback,
    pub down_policy: DownPolicy,
    /// How long without leader contact before `down_policy` applies.
    pub down_after: std::time::Duration,
    /// The token requests without one act as instead of the anonymous
    /// token (Consul's `acl.tokens.default`).
    pub default_token: Option<Secret>,
    /// The token DNS answers as (Consul's `acl.tokens.dns`; falls back to
    /// the default token, then anonymous).
    pub dns_token: Option<Secret>,
    pub datacenter: String,
}

impl AclSettings {
    pub fn disabled(datacenter: &str) -> Self {
        Self {
            enabled: false,
            default_policy: Fallback::Deny,
            down_policy: DownPolicy::ExtendCache,
            down_after: std::time::Duration::from_secs(30),
            default_token: None,
            dns_token: None,
            datacenter: datacenter.to_owned(),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The token is unknown or expired (Consul's "ACL not found").
    TokenNotFound,
    /// The token lacks a permission.
    Denied {
        /// `None` for the anonymous token.
        accessor: Option<String>,
        permission: String,
        on: Option<String>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TokenNotFound => f.write_str("ACL not found"),
            Refusal::Denied {
                accessor,
                permission,
                on,
            } => {
                f.write_str("Permission denied: ")?;
                match accessor {
                    Some(id) => write!(f, "token with AccessorID '{id}'")?,
                    None => f.write_str("anonymous token")?,
                }
                write!(f, " lacks permission '{permission}'")?;
                if let Some(name) = on {
                    write!(f, " on {name:?}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// A request's identity and rights: every permission check goes through
/// here.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The token's accessor id; `None` when ACLs are off.
    accessor: Option<Arc<str>>,
    authorizer: Arc<Authorizer>,
    /// The ACL tables' index it was resolved at.
    acl_index: u64,
}

impl Resolved {
    /// The rights of a token with these rules, default deny (tests of
    /// what a handler shows to whom).
    #[cfg(test)]
    pub fn with_rules(rules: &str) -> Result<Self, rules::RulesError> {
        let rules = rules::parse(rules)?;
        Ok(Self {
            accessor: Some(Arc::from("test")),
            authorizer: Arc::new(Authorizer::compile([&rules], Fallback::Deny)),
            acl_index: 1,
        })
    }

    /// Everything allowed (ACLs off): shared, no allocation per request.
    pub fn everything() -> Self {
        static EVERYTHING: std::sync::LazyLock<Arc<Authorizer>> =
            std::sync::LazyLock::new(|| Arc::new(Authorizer::everything()));
        Self {
            accessor: None,
            authorizer: Arc::clone(&EVERYTHING),
            acl_index: 0,
        }
    }

    /// Nothing allowed: what a server answers as when its configured
    /// token does not resolve (refuse rather than guess).
    pub fn nothing() -> Self {
        Self {
            accessor: None,
            authorizer: Arc::new(Authorizer::compile([], Fallback::Deny)),
            acl_index: u64::MAX - 2,
        }
    }

    pub fn accessor(&self) -> Option<&str> {
        self.accessor.as_deref()
    }

    /// The ACL tables' index this was resolved at: a resolution at another
    /// index may grant something else.
    pub fn acl_index(&self) -> u64 {
        self.acl_index
    }

    pub fn allows(&self, kind: Kind, name: &str, need: Need) -> bool {
        self.authorizer.allows(kind, name, need)
    }

    pub fn allows_single(&self, single: Single, need: Need) -> bool {
        self.authorizer.allows_single(single, need)
    }

    /// Whether every name of `kind` may be read (a list needs no per-item
    /// check).
    pub fn reads_all(&self, kind: Kind) -> bool {
        self.authorizer.reads_all(kind)
    }

    /// Whether `need` is granted on every name under `prefix`.
    pub fn allows_prefix(&self, kind: Kind, prefix: &str, need: Need) -> bool {
        self.authorizer.allows_prefix(kind, prefix, need)
    }

    pub fn is_management(&self) -> bool {
        self.authorizer.is_management()
    }

    fn denied(&self, permission: String, on: Option<&str>) -> Refusal {
        Refusal::Denied {
            accessor: self
                .accessor
                .as_deref()
                .filter(|a| *a != ANONYMOUS_ACCESSOR)
                .map(str::to_owned),
            permission,
            on: on.map(str::to_owned),
        }
    }

    /// `need` on `name`, or the refusal that names what is missing.
    pub fn require(&self, kind: Kind, name: &str, need: Need) -> Result<(), Refusal> {
        if self.allows(kind, name, need) {
            Ok(())
        } else {
            Err(self.denied(format!("{}:{need}", kind.name()), Some(name)))
        }
    }

    /// `need` on every name under `prefix`.
    pub fn require_prefix(&self, kind: Kind, prefix: &str, need: Need) -> Result<(), Refusal> {
        if self.authorizer.allows_prefix(kind, prefix, need) {
            Ok(())
        } else {
            Err(self.denied(format!("{}:{need}", kind.name()), Some(prefix)))
        }
    }

    pub fn require_single(&self, single: Single, need: Need) -> Result<(), Refusal> {
        if self.allows_single(single, need) {
            Ok(())
        } else {
            Err(self.denied(format!("{}:{need}", single.name()), None))
        }
    }

    /// The identity a shared (cached) read must be keyed by: `None` when
    /// this token sees everything unfiltered.
    pub fn view_key(&self) -> Option<String> {
        if self.is_management() {
            return None;
        }
        Some(format!(
            "{}@{}",
            self.accessor.as_deref().unwrap_or(""),
            self.acl_index
        ))
    }
}

/// Who may read or write a config entry (Consul's `CanRead` / `CanWrite`
/// per kind): a service's entries follow the service's rules, intentions
/// the destination's `intentions` rule, mesh-wide entries `mesh` (which
/// falls back to `operator`); anyone may read `proxy-defaults`.
pub fn config_entry_permission(
    authz: &Resolved,
    kind: &str,
    name: &str,
    need: Need,
) -> Result<(), Refusal> {
    match (kind, need) {
        ("service-defaults" | "service-router" | "service-splitter" | "service-resolver", _) => {
            authz.require(Kind::Service, name, need)
        }
        ("service-intentions", _) => authz.require(Kind::Intention, name, need),
        ("proxy-defaults", Need::Read | Need::List) => Ok(()),
        ("ingress-gateway" | "terminating-gateway", Need::Read | Need::List) => {
            authz.require(Kind::Service, name, Need::Read)
        }
        _ => authz.require_single(Single::Mesh, need),
    }
}

/// Keeps `items` the token may read by `name_of`; says whether any was
/// dropped (Consul's `X-Consul-Results-Filtered-By-ACLs`).
pub fn filter<T>(items: &mut Vec<T>, mut keep: impl FnMut(&T) -> bool) -> bool {
    let before = items.len();
    items.retain(|item| keep(item));
    items.len() != before
}

/// Resolutions cached at once before the cache is emptied.
const CACHE_MAX: usize = 16_384;
/// Longest secret looked up (Consul's are UUIDs).
const MAX_SECRET_BYTES: usize = 256;

#[derive(Debug)]
struct Cached {
    acl_index: u64,
    resolved: Resolved,
    expiration_ns: Option<u64>,
}

/// Token resolution for one server.
#[derive(Debug)]
pub struct Acl {
    settings: AclSettings,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Acl {
    pub fn new(settings: AclSettings) -> Self {
        Self {
            settings,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    pub fn settings(&self) -> &AclSettings {
        &self.settings
    }

    /// The rights of `secret` (or of the default or anonymous token when
    /// none is given), as this server's replica says at `now_ns`.
    /// `leader_lost` says whether the server has been without a leader
    /// for longer than `down_after`.
    pub fn resolve(
        &self,
        acl_store: &AclStore,
        secret: Option<&str>,
        now_ns: u64,
        leader_lost: bool,
    ) -> Result<Resolved, Refusal> {
        if !self.settings.enabled {
            return Ok(Resolved::everything());
        }
        if leader_lost {
            match self.settings.down_policy {
                // Indexes no table reaches keep these two views apart in
                // shared reads.
                DownPolicy::Allow => {
                    return Ok(Resolved {
                        accessor: None,
                        authorizer: Arc::new(Authorizer::compile([], Fallback::Allow)),
                        acl_index: u64::MAX,
                    });
                }
                DownPolicy::Deny => {
                    return Ok(Resolved {
                        accessor: None,
                        authorizer: Arc::new(Authorizer::compile([], Fallback::Deny)),
                        acl_index: u64::MAX - 1,
                    });
                }
                DownPolicy::ExtendCache | DownPolicy::AsyncCache => {}
            }
        }
        let secret = match secret.filter(|s| !s.is_empty()) {
            Some(s) => s,
            None => self
                .settings
                .default_token
                .as_ref()
                .map_or(ANONYMOUS_SECRET, Secret::expose),
        };
        if secret.len() > MAX_SECRET_BYTES {
            return Err(Refusal::TokenNotFound);
        }
        let acl_index = acl_store.index();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = cache.get(secret)
                && hit.acl_index == acl_index
            {
                if hit.expiration_ns.is_some_and(|at| at <= now_ns) {
                    return Err(Refusal::TokenNotFound);
                }
                return Ok(hit.resolved.clone());
            }
        }
        let token = acl_store
            .token_by_secret(secret)
            .ok_or(Refusal::TokenNotFound)?;
        if token.expired(now_ns) {
            return Err(Refusal::TokenNotFound);
        }
        let resolved = Resolved {
            accessor: Some(Arc::from(token.accessor_id.as_str())),
            authorizer: Arc::new(self.compile(acl_store, &token)),
            acl_index,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            secret.to_owned(),
            Cached {
                acl_index,
                resolved: resolved.clone(),
                expiration_ns: token.expiration_ns,
            },
        );
        Ok(resolved)
    }

    /// The rights DNS answers with.
    pub fn resolve_dns(&self, acl_store: &AclStore, now_ns: u64) -> Result<Resolved, Refusal> {
        let secret = self.settings.dns_token.as_ref().map(Secret::expose);
        self.resolve(acl_store, secret, now_ns, false)
    }

    /// A token's policies (direct, through its roles, and its identities)
    /// compiled. Policies limited to other datacenters, and links to
    /// policies or roles since deleted, are skipped; stored rules that no
    /// longer parse (they were checked when written) grant nothing.
    fn compile(&self, acl: &AclStore, token: &Token) -> Authorizer {
        let dc = self.settings.datacenter.as_str();
        let mut policy_ids: Vec<&str> = token.policies.iter().map(String::as_str).collect();
        let mut services: Vec<&ServiceIdentity> = token.service_identities.iter().collect();
        let mut nodes: Vec<&NodeIdentity> = token.node_identities.iter().collect();
        for role in token.roles.iter().filter_map(|id| acl.role(id)) {
            policy_ids.extend(role.policies.iter().map(String::as_str));
            services.extend(&role.service_identities);
            nodes.extend(&role.node_identities);
        }
        policy_ids.sort_unstable();
        policy_ids.dedup();
        let mut all = Vec::new();
        for policy in policy_ids.into_iter().filter_map(|id| acl.policy(id)) {
            if !policy.datacenters.is_empty() && !policy.datacenters.iter().any(|d| d == dc) {
                continue;
            }
            match rules::parse(&policy.rules) {
                Ok(r) => all.push(r),
                Err(e) => {
                    tracing::warn!(policy = %policy.name, error = %e, "stored ACL policy does not parse; it grants nothing");
                }
            }
        }
        for identity in services {
            if !identity.datacenters.is_empty() && !identity.datacenters.iter().any(|d| d == dc) {
                continue;
            }
            all.push(service_identity_rules(&identity.service_name));
        }
        for identity in nodes {
            if identity.datacenter == dc {
                all.push(node_identity_rules(&identity.node_name));
            }
        }
        Authorizer::compile(&all, self.settings.default_policy)
    }
}

fn rule(kind: Kind, name: &str, prefix: bool, access: Access) -> rules::Rule {
    rules::Rule {
        kind,
        name: name.to_owned(),
        prefix,
        access,
    }
}

/// Consul's service identity: write the service (and its sidecar), read
/// every service and node (for discovery).
fn service_identity_rules(service: &str) -> rules::Rules {
    rules::Rules {
        rules: vec![
            rule(Kind::Service, service, false, Access::Write),
            rule(
                Kind::Service,
                &format!("{service}-sidecar-proxy"),
                false,
                Access::Write,
            ),
            rule(Kind::Intention, service, false, Access::Read),
            rule(Kind::Service, "", true, Access::Read),
            rule(Kind::Node, "", true, Access::Read),
        ],
        singles: Vec::new(),
    }
}

/// Consul's node identity: write the node, read every service.
fn node_identity_rules(node: &str) -> rules::Rules {
    rules::Rules {
        rules: vec![
            rule(Kind::Node, node, false, Access::Write),
            rule(Kind::Service, "", true, Access::Read),
        ],
        singles: Vec::new(),
    }
}

/// Takes the token a REST request carries, as Consul: `?token=`, then
/// `X-Consul-Token`, then `Authorization: Bearer`.
pub fn request_token<'a>(
    query_token: Option<&'a str>,
    headers: &'a axum::http::HeaderMap,
) -> Option<&'a str> {
    if let Some(t) = query_token.filter(|t| !t.is_empty()) {
        return Some(t);
    }
    if let Some(t) = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some(t);
    }
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use crate::state::acl::{GLOBAL_MANAGEMENT_ID, Policy};

    fn settings() -> AclSettings {
        AclSettings {
            enabled: true,
            ..AclSettings::disabled("dc1")
        }
    }

    fn state_with(token: Token, policy: Option<Policy>) -> State {
        let mut state = State::default();
        if let Some(p) = policy {
            state.acl.set_policy(2, &p).expect("policy");
        }
        state.acl.set_token(3, &token).expect("token");
        state
    }

    #[test]
    fn resolves_and_refuses_with_consul_messages() {
        let policy = Policy {
            id: "p".into(),
            name: "kv".into(),
            rules: r#"key_prefix "app/" { policy = "write" }"#.into(),
            ..Policy::default()
        };
        let token = Token {
            accessor_id: "acc-1".into(),
            secret_id: "sec-1".into(),
            policies: vec!["p".into()],
            expiration_ns: Some(1_000),
            ..Token::default()
        };
        let state = state_with(token, Some(policy));
        let acl = Acl::new(settings());
        let r = acl
            .resolve(&state.acl, Some("sec-1"), 10, false)
            .expect("known");
        assert!(r.require(Kind::Key, "app/x", Need::Write).is_ok());
        let refusal = r
            .require(Kind::Key, "etc/x", Need::Read)
            .expect_err("outside");
        assert_eq!(
            refusal.to_string(),
            "Permission denied: token with AccessorID 'acc-1' lacks permission 'key:read' on \"etc/x\""
        );
        assert_eq!(
            acl.resolve(&state.acl, Some("nope"), 10, false)
                .expect_err("unknown"),
            Refusal::TokenNotFound
        );
        // Cached, and still expires.
        assert_eq!(
            acl.resolve(&state.acl, Some("sec-1"), 1_000, false)
                .expect_err("expired"),
            Refusal::TokenNotFound
        );
        let anonymous = acl.resolve(&state.acl, None, 10, false).expect("anonymous");
        assert_eq!(
            anonymous
                .require_single(Single::Operator, Need::Read)
                .expect_err("deny")
                .to_string(),
            "Permission denied: anonymous token lacks permission 'operator:read'"
        );
    }

    #[test]
    fn a_change_to_the_tables_reaches_cached_tokens() {
        let token = Token {
            accessor_id: "acc".into(),
            secret_id: "sec".into(),
            policies: vec![GLOBAL_MANAGEMENT_ID.into()],
            ..Token::default()
        };
        let mut state = state_with(token, None);
        let acl = Acl::new(settings());
        assert!(
            acl.resolve(&state.acl, Some("sec"), 1, false)
                .expect("ok")
                .is_management()
        );
        state.acl.delete_token(9, "acc").expect("delete");
        assert_eq!(
            acl.resolve(&state.acl, Some("sec"), 1, false)
                .expect_err("revoked"),
            Refusal::TokenNotFound
        );
    }

    #[test]
    fn down_policy_applies_only_without_a_leader() {
        let state = State::default();
        let acl = Acl::new(AclSettings {
            down_policy: DownPolicy::Allow,
            ..settings()
        });
        let up = acl.resolve(&state.acl, None, 1, false).expect("anonymous");
        assert!(!up.allows(Kind::Key, "k", Need::Read));
        let down = acl.resolve(&state.acl, None, 1, true).expect("down");
        assert!(down.allows(Kind::Key, "k", Need::Read));
        assert!(!down.is_management());
    }

    #[test]
    fn token_comes_from_query_then_headers() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("authorization", "Bearer b".parse().expect("h"));
        assert_eq!(request_token(None, &headers), Some("b"));
        headers.insert("x-consul-token", "x".parse().expect("h"));
        assert_eq!(request_token(None, &headers), Some("x"));
        assert_eq!(request_token(Some("q"), &headers), Some("q"));
        let mut basic = axum::http::HeaderMap::new();
        basic.insert("authorization", "Basic abc".parse().expect("h"));
        assert_eq!(request_token(None, &basic), None);
    }

    #[test]
    fn identities_grant_their_service_and_discovery() {
        let token = Token {
            accessor_id: "a".into(),
            secret_id: "s".into(),
            service_identities: vec![ServiceIdentity {
                service_name: "web".into(),
                datacenters: vec![],
            }],
            ..Token::default()
        };
        let state = state_with(token, None);
        let r = Acl::new(settings())
            .resolve(&state.acl, Some("s"), 1, false)
            .expect("ok");
        assert!(r.allows(Kind::Service, "web", Need::Write));
        assert!(r.allows(Kind::Service, "db", Need::Read));
        assert!(!r.allows(Kind::Service, "db", Need::Write));
        assert!(!r.allows(Kind::Key, "k", Need::Read));
    }
}
