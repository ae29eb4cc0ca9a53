//! Consul's ACL tables: tokens, policies and roles. Pure data; rules are
//! stored as the text the operator wrote and compiled where they are
//! enforced ([`crate::auth`]). Links between the tables are by id; a link
//! to a policy or role since deleted is skipped where it is read, as
//! Consul does.
//!
//! Two objects exist without being written: the built-in
//! `global-management` policy (every permission) and, until it is
//! changed, the anonymous token (no policies) that requests without a
//! token act as.

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

/// Consul's fixed id of the built-in policy that grants everything.
pub const GLOBAL_MANAGEMENT_ID: &str = "00000000-0000-0000-0000-000000000001";
pub const GLOBAL_MANAGEMENT_NAME: &str = "global-management";
/// Consul's fixed accessor and secret of the anonymous token.
pub const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";
pub const ANONYMOUS_SECRET: &str = "anonymous";

/// A service identity: the rights a service's own sidecar needs
/// (Consul's templated policy: write its service, read the catalog).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIdentity {
    pub service_name: String,
    #[serde(default)]
    pub datacenters: Vec<String>,
}

/// A node identity: write the node, read every service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_name: String,
    pub datacenter: String,
}

/// A token as written (indexes assigned on apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub accessor_id: String,
    pub secret_id: String,
    pub description: String,
    /// Policy ids.
    pub policies: Vec<String>,
    /// Role ids.
    pub roles: Vec<String>,
    #[serde(default)]
    pub service_identities: Vec<ServiceIdentity>,
    #[serde(default)]
    pub node_identities: Vec<NodeIdentity>,
    pub local: bool,
    /// When it was made, in Unix nanoseconds (set by the server that took
    /// the request).
    pub create_time_ns: u64,
    /// When it stops working, in Unix nanoseconds.
    pub expiration_ns: Option<u64>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

impl Token {
    /// Whether the token no longer works at `now_ns`.
    pub fn expired(&self, now_ns: u64) -> bool {
        self.expiration_ns.is_some_and(|at| at <= now_ns)
    }
}

/// A named set of rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub id: String,
    pub name: String,
    pub description: String,
    /// In Consul's rule language (HCL or JSON), checked when written.
    pub rules: String,
    pub datacenters: Vec<String>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// A named set of policies and identities that tokens link to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub id: String,
    pub name: String,
    pub description: String,
    pub policies: Vec<String>,
    #[serde(default)]
    pub service_identities: Vec<ServiceIdentity>,
    #[serde(default)]
    pub node_identities: Vec<NodeIdentity>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// Why an ACL write was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("Permission denied: ACL bootstrap no longer allowed (reset index: {0})")]
    BootstrapDone(u64),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
}

/// Every token, policy and role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclStore {
    tokens: OrdMap<String, Token>,
    /// SecretID → AccessorID.
    by_secret: OrdMap<String, String>,
    policies: OrdMap<String, Policy>,
    /// Name → id.
    policy_names: OrdMap<String, String>,
    roles: OrdMap<String, Role>,
    role_names: OrdMap<String, String>,
    /// The index of the bootstrap, 0 before it (Consul's reset index).
    bootstrapped_at: u64,
    /// Index of the last change to any ACL table: what a cached
    /// resolution is checked against, and blocking ACL reads wait on.
    index: u64,
}

impl AclStore {
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn bootstrapped_at(&self) -> Option<u64> {
        (self.bootstrapped_at > 0).then_some(self.bootstrapped_at)
    }

    /// The built-in policy that grants everything.
    pub fn global_management() -> Policy {
        Policy {
            id: GLOBAL_MANAGEMENT_ID.to_owned(),
            name: GLOBAL_MANAGEMENT_NAME.to_owned(),
            description: "Builtin Policy that grants unlimited access".to_owned(),
            rules: MANAGEMENT_RULES.to_owned(),
            ..Policy::default()
        }
    }

    fn anonymous() -> Token {
        Token {
            accessor_id: ANONYMOUS_ACCESSOR.to_owned(),
            secret_id: ANONYMOUS_SECRET.to_owned(),
            description: "Anonymous Token".to_owned(),
            ..Token::default()
        }
    }

    pub fn token(&self, accessor: &str) -> Option<Token> {
        match self.tokens.get(accessor) {
            Some(t) => Some(t.clone()),
            None if accessor == ANONYMOUS_ACCESSOR => Some(Self::anonymous()),
            None => None,
        }
    }

    pub fn token_by_secret(&self, secret: &str) -> Option<Token> {
        match self.by_secret.get(secret) {
            Some(accessor) => self.tokens.get(accessor).cloned(),
            None if secret == ANONYMOUS_SECRET => self.token(ANONYMOUS_ACCESSOR),
            None => None,
        }
    }

    /// Every token, the anonymous one included, by accessor id.
    pub fn tokens(&self) -> Vec<Token> {
        let mut all: Vec<Token> = self.tokens.values().cloned().collect();
        if !self.tokens.contains_key(ANONYMOUS_ACCESSOR) {
            all.push(Self::anonymous());
            all.sort_by(|a, b| a.accessor_id.cmp(&b.accessor_id));
        }
        all
    }

    pub fn policy(&self, id: &str) -> Option<Policy> {
        match self.policies.get(id) {
            Some(p) => Some(p.clone()),
            None if id == GLOBAL_MANAGEMENT_ID => Some(Self::global_management()),
            None => None,
        }
    }

    pub fn policy_by_name(&self, name: &str) -> Option<Policy> {
        match self.policy_names.get(name) {
            Some(id) => self.policy(id),
            None if name == GLOBAL_MANAGEMENT_NAME => Some(Self::global_management()),
            None => None,
        }
    }

    /// Every policy, the built-in one included, by id.
    pub fn policies(&self) -> Vec<Policy> {
        let mut all: Vec<Policy> = self.policies.values().cloned().collect();
        if !self.policies.contains_key(GLOBAL_MANAGEMENT_ID) {
            all.push(Self::global_management());
            all.sort_by(|a, b| a.id.cmp(&b.id));
        }
        all
    }

    pub fn role(&self, id: &str) -> Option<&Role> {
        self.roles.get(id)
    }

    pub fn role_by_name(&self, name: &str) -> Option<&Role> {
        self.role_names.get(name).and_then(|id| self.roles.get(id))
    }

    pub fn roles(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }

    /// The first token, with the management policy: once per cluster.
    pub(crate) fn bootstrap(&mut self, index: u64, token: &Token) -> Result<(), AclError> {
        if self.bootstrapped_at > 0 {
            return Err(AclError::BootstrapDone(self.bootstrapped_at));
        }
        let mut token = token.clone();
        token.policies = vec![GLOBAL_MANAGEMENT_ID.to_owned()];
        self.set_token(index, &token)?;
        self.bootstrapped_at = index;
        Ok(())
    }

    /// Creates or replaces a token. Its links must name existing policies
    /// and roles; its secret may not be another token's, and an existing
    /// token's secret never changes.
    pub(crate) fn set_token(&mut self, index: u64, token: &Token) -> Result<(), AclError> {
        if let Some(other) = self.by_secret.get(&token.secret_id)
            && *other != token.accessor_id
        {
            return Err(AclError::Invalid(
                "Invalid Token: SecretID already in use".into(),
            ));
        }
        if token.secret_id == ANONYMOUS_SECRET && token.accessor_id != ANONYMOUS_ACCESSOR {
            return Err(AclError::Invalid(
                "Invalid Token: SecretID already in use".into(),
            ));
        }
        let existing = self.token(&token.accessor_id);
        if let Some(old) = &existing
            && old.secret_id != token.secret_id
        {
            return Err(AclError::Invalid(
                "Cannot change a token's SecretID".to_owned(),
            ));
        }
        if self.by_secret.contains_key(&token.accessor_id) && existing.is_none() {
            return Err(AclError::Invalid(
                "Invalid Token: AccessorID already in use".to_owned(),
            ));
        }
        for id in &token.policies {
            if self.policy(id).is_none() {
                return Err(AclError::NotFound(format!("cannot find policy {id}")));
            }
        }
        for id in &token.roles {
            if !self.roles.contains_key(id) {
                return Err(AclError::NotFound(format!("cannot find role {id}")));
            }
        }
        let mut token = token.clone();
        // The implicit anonymous token has index 0 until first written.
        token.create_index = match &existing {
            Some(old) if old.create_index > 0 => old.create_index,
            _ => index,
        };
        token.modify_index = index;
        self.by_secret
            .insert(token.secret_id.clone(), token.accessor_id.clone());
        self.tokens.insert(token.accessor_id.clone(), token);
        self.index = index;
        Ok(())
    }

    pub(crate) fn delete_token(&mut self, index: u64, accessor: &str) -> Result<bool, AclError> {
        if accessor == ANONYMOUS_ACCESSOR {
            return Err(AclError::Invalid(
                "Delete operation not permitted on the anonymous token".to_owned(),
            ));
        }
        let Some(token) = self.tokens.remove(accessor) else {
            return Ok(false);
        };
        self.by_secret.remove(&token.secret_id);
        self.index = index;
        Ok(true)
    }

    /// Creates or replaces a policy; names are unique, and the built-in
    /// policy's rules cannot change.
    pub(crate) fn set_policy(&mut self, index: u64, policy: &Policy) -> Result<(), AclError> {
        if let Some(other) = self.policy_by_name(&policy.name)
            && other.id != policy.id
        {
            return Err(AclError::Invalid(format!(
                "Invalid Policy: A Policy with Name {:?} already exists",
                policy.name
            )));
        }
        if policy.id == GLOBAL_MANAGEMENT_ID && policy.rules != MANAGEMENT_RULES {
            return Err(AclError::Invalid(
                "Changing the Rules for the builtin global-management policy is not permitted"
                    .to_owned(),
            ));
        }
        if policy.id == GLOBAL_MANAGEMENT_ID && !policy.datacenters.is_empty() {
            return Err(AclError::Invalid(
                "Changing the Datacenters of the builtin global-management policy is not permitted"
                    .to_owned(),
            ));
        }
        let existing = self.policy(&policy.id);
        let mut policy = policy.clone();
        policy.create_index = match &existing {
            Some(old) if old.create_index > 0 => old.create_index,
            _ => index,
        };
        policy.modify_index = index;
        if let Some(old) = existing {
            self.policy_names.remove(&old.name);
        }
        self.policy_names
            .insert(policy.name.clone(), policy.id.clone());
        self.policies.insert(policy.id.clone(), policy);
        self.index = index;
        Ok(())
    }

    pub(crate) fn delete_policy(&mut self, index: u64, id: &str) -> Result<bool, AclError> {
        if id == GLOBAL_MANAGEMENT_ID {
            return Err(AclError::Invalid(
                "Delete operation not permitted on the builtin global-management policy".to_owned(),
            ));
        }
        let Some(policy) = self.policies.remove(id) else {
            return Ok(false);
        };
        self.policy_names.remove(&policy.name);
        self.index = index;
        Ok(true)
    }

    /// Creates or replaces a role; names are unique and its policies exist.
    pub(crate) fn set_role(&mut self, index: u64, role: &Role) -> Result<(), AclError> {
        if let Some(other) = self.role_by_name(&role.name)
            && other.id != role.id
        {
            return Err(AclError::Invalid(format!(
                "Invalid Role: A Role with Name {:?} already exists",
                role.name
            )));
        }
        for id in &role.policies {
            if self.policy(id).is_none() {
                return Err(AclError::NotFound(format!("cannot find policy {id}")));
            }
        }
        let mut role = role.clone();
        role.create_index = self.roles.get(&role.id).map_or(index, |r| r.create_index);
        role.modify_index = index;
        if let Some(old) = self.roles.get(&role.id) {
            let old_name = old.name.clone();
            self.role_names.remove(&old_name);
        }
        self.role_names.insert(role.name.clone(), role.id.clone());
        self.roles.insert(role.id.clone(), role);
        self.index = index;
        Ok(())
    }

    pub(crate) fn delete_role(&mut self, index: u64, id: &str) -> bool {
        let Some(role) = self.roles.remove(id) else {
            return false;
        };
        self.role_names.remove(&role.name);
        self.index = index;
        true
    }

    /// Takes a backup's tables as one change at `index`.
    pub(crate) fn restore(&mut self, index: u64, backup: &AclStore) {
        *self = backup.clone();
        self.index = index;
    }
}

/// The rules of `global-management`: every permission.
pub const MANAGEMENT_RULES: &str = r#"acl = "write"
agent_prefix "" {
  policy = "write"
}
event_prefix "" {
  policy = "write"
}
key_prefix "" {
  policy = "write"
}
keyring = "write"
node_prefix "" {
  policy = "write"
}
operator = "write"
mesh = "write"
peering = "write"
query_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
  intentions = "write"
}
session_prefix "" {
  policy = "write"
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn token(accessor: &str, secret: &str) -> Token {
        Token {
            accessor_id: accessor.into(),
            secret_id: secret.into(),
            ..Token::default()
        }
    }

    #[test]
    fn bootstrap_happens_once() {
        let mut acl = AclStore::default();
        acl.bootstrap(5, &token("a", "s")).expect("first");
        assert_eq!(
            acl.token_by_secret("s").map(|t| t.policies),
            Some(vec![GLOBAL_MANAGEMENT_ID.to_owned()])
        );
        let err = acl.bootstrap(9, &token("b", "t")).expect_err("second");
        assert_eq!(err, AclError::BootstrapDone(5));
        assert!(acl.token("b").is_none());
    }

    #[test]
    fn secrets_are_unique_and_fixed() {
        let mut acl = AclStore::default();
        acl.set_token(2, &token("a", "s1")).expect("a");
        assert!(
            acl.set_token(3, &token("b", "s1")).is_err(),
            "secret reused"
        );
        assert!(
            acl.set_token(3, &token("a", "s2")).is_err(),
            "secret changed"
        );
        assert!(
            acl.set_token(3, &token("b", ANONYMOUS_SECRET)).is_err(),
            "anonymous secret"
        );
        let mut with_policy = token("c", "s3");
        with_policy.policies = vec!["missing".into()];
        assert!(matches!(
            acl.set_token(3, &with_policy),
            Err(AclError::NotFound(_))
        ));
        assert_eq!(acl.index(), 2, "refusals change nothing");
    }

    #[test]
    fn names_are_unique_and_builtins_protected() {
        let mut acl = AclStore::default();
        let policy = Policy {
            id: "p1".into(),
            name: "web".into(),
            rules: String::new(),
            ..Policy::default()
        };
        acl.set_policy(2, &policy).expect("p1");
        let clash = Policy {
            id: "p2".into(),
            ..policy.clone()
        };
        assert!(acl.set_policy(3, &clash).is_err());
        let renamed = Policy {
            name: "web2".into(),
            ..policy
        };
        acl.set_policy(4, &renamed).expect("rename");
        assert!(acl.policy_by_name("web").is_none());
        assert_eq!(acl.policy_by_name("web2").map(|p| p.create_index), Some(2));
        assert!(acl.delete_policy(5, GLOBAL_MANAGEMENT_ID).is_err());
        assert!(acl.delete_token(5, ANONYMOUS_ACCESSOR).is_err());
        let mut builtin = AclStore::global_management();
        builtin.rules = "acl = \"read\"".into();
        assert!(acl.set_policy(5, &builtin).is_err());
        let mut elsewhere = AclStore::global_management();
        elsewhere.datacenters = vec!["nowhere".into()];
        assert!(
            acl.set_policy(5, &elsewhere).is_err(),
            "it must work everywhere"
        );
        assert_eq!(acl.policies().len(), 2);
        assert_eq!(acl.tokens().len(), 1, "the anonymous token");
    }
}
