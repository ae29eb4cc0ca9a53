//! The mesh CA's replicated part (Consul's built-in `consul` provider):
//! its roots — each a self-signed certificate with its private key — the
//! one that signs new leaves, and the CA configuration. Certificates are
//! made outside the state ([`crate::connect`], with the clock and the
//! random source); the state only records them, in log order.
//!
//! The private keys are part of the replicated state (every server can
//! sign), are written only to the servers' own data dirs, and are never
//! in a backup (`GET /v1/snapshot` leaves the CA out and a restore keeps
//! the cluster's own, as it keeps the cluster id), an API answer or a log.

use serde::{Deserialize, Serialize};

/// The CA: roots (the active one last rotated in) and configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStore {
    pub roots: Vec<CaRoot>,
    pub config: CaConfig,
    /// Index of the last change (roots or configuration).
    pub index: u64,
}

/// One root.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRoot {
    /// The key id (colon-separated hex of the subject key identifier),
    /// Consul's `ID` and `SigningKeyID`.
    pub id: String,
    pub name: String,
    /// Colon-separated hex.
    pub serial: String,
    pub root_cert_pem: String,
    /// The root cross-signed by the root it replaced, so peers that only
    /// trust the old root accept leaves of the new one during a rotation.
    pub intermediate_cert_pems: Vec<String>,
    /// The root whose key signed `intermediate_cert_pems`.
    #[serde(default)]
    pub cross_signed_by: Option<String>,
    /// The longest leaf lifetime in force while this root signed: it is
    /// pruned that long after its rotation, whatever the TTL is by then.
    #[serde(default)]
    pub max_leaf_ttl_secs: u64,
    /// PKCS#8 PEM. Never shown, never logged (see `Debug`).
    pub private_key_pem: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub active: bool,
    /// When it stopped signing (Unix seconds): pruned a leaf TTL later.
    pub rotated_out_unix: Option<i64>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl std::fmt::Debug for CaRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRoot")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Consul's CA configuration (`/v1/connect/ca/configuration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaConfig {
    /// A leaf's lifetime.
    pub leaf_cert_ttl_secs: u64,
    /// A root's lifetime when generated.
    pub root_cert_ttl_secs: u64,
    pub modify_index: u64,
    pub create_index: u64,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            leaf_cert_ttl_secs: 72 * 3600,
            root_cert_ttl_secs: 10 * 365 * 24 * 3600,
            modify_index: 0,
            create_index: 0,
        }
    }
}

impl CaStore {
    /// The root that signs new leaves.
    pub fn active(&self) -> Option<&CaRoot> {
        self.roots.iter().find(|r| r.active)
    }

    /// Makes `root` the active root, the previous one (if any) rotated
    /// out at `now_unix`, when the active root is still `expect_active`
    /// (`None`: there is none yet) — so two leaders racing to create the
    /// first root, or two rotations at once, leave one result. False when
    /// the precondition failed.
    pub fn rotate(
        &mut self,
        index: u64,
        expect_active: Option<&str>,
        root: &CaRoot,
        config: Option<&CaConfig>,
        now_unix: i64,
    ) -> bool {
        if self.active().map(|r| r.id.as_str()) != expect_active
            || self.roots.iter().any(|r| r.id == root.id)
        {
            return false;
        }
        let seed = self.seed_ttl();
        for old in self.roots.iter_mut().filter(|r| r.active) {
            if old.max_leaf_ttl_secs == 0 {
                old.max_leaf_ttl_secs = seed;
            }
            old.active = false;
            old.rotated_out_unix = Some(now_unix);
            old.modify_index = index;
        }
        let mut root = root.clone();
        root.active = true;
        root.rotated_out_unix = None;
        root.create_index = index;
        root.modify_index = index;
        root.max_leaf_ttl_secs = 0;
        self.roots.push(root);
        let config = config.cloned().unwrap_or_else(|| self.config.clone());
        self.set_config(index, &config);
        true
    }

    /// What a root recorded before the longest leaf lifetime was kept
    /// (written by an earlier version) is taken to have signed with: the
    /// longer of the lifetime in force and the default.
    fn seed_ttl(&self) -> u64 {
        self.config
            .leaf_cert_ttl_secs
            .max(CaConfig::default().leaf_cert_ttl_secs)
    }

    /// Replaces the configuration (its indexes are the store's).
    pub fn set_config(&mut self, index: u64, config: &CaConfig) {
        let seed = self.seed_ttl();
        for root in self
            .roots
            .iter_mut()
            .filter(|r| r.active && r.max_leaf_ttl_secs == 0)
        {
            // Not for a root just made by `rotate` (no leaf signed yet):
            // its create_index is this write's.
            if root.create_index != index {
                root.max_leaf_ttl_secs = seed;
            }
        }
        let create_index = if self.config.create_index == 0 {
            index
        } else {
            self.config.create_index
        };
        self.config = CaConfig {
            create_index,
            modify_index: index,
            ..config.clone()
        };
        let ttl = self.config.leaf_cert_ttl_secs;
        for root in self.roots.iter_mut().filter(|r| r.active) {
            root.max_leaf_ttl_secs = root.max_leaf_ttl_secs.max(ttl);
        }
        self.index = index;
    }

    /// Removes rotated-out roots by id (never the active one). The
    /// remaining roots' cross-signed certificates that chain to a removed
    /// root go too. False when nothing matched.
    pub fn prune(&mut self, index: u64, ids: &[String]) -> bool {
        let before = self.roots.len();
        let gone: Vec<CaRoot> = self
            .roots
            .iter()
            .filter(|r| !r.active && ids.contains(&r.id))
            .cloned()
            .collect();
        if gone.is_empty() {
            return false;
        }
        self.roots.retain(|r| r.active || !ids.contains(&r.id));
        debug_assert!(self.roots.len() < before);
        // A cross-signed certificate is only useful while its issuer is
        // trusted; once that root is gone, drop it from the chains.
        for root in &mut self.roots {
            if root
                .cross_signed_by
                .as_ref()
                .is_some_and(|by| ids.contains(by))
            {
                root.intermediate_cert_pems.clear();
                root.cross_signed_by = None;
                root.modify_index = index;
            }
        }
        self.index = index;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(id: &str) -> CaRoot {
        CaRoot {
            id: id.into(),
            name: format!("root {id}"),
            serial: "01".into(),
            root_cert_pem: String::new(),
            intermediate_cert_pems: vec![],
            cross_signed_by: None,
            max_leaf_ttl_secs: 0,
            private_key_pem: "SECRET".into(),
            not_before_unix: 0,
            not_after_unix: 100,
            active: false,
            rotated_out_unix: None,
            create_index: 0,
            modify_index: 0,
        }
    }

    #[test]
    fn the_first_root_wins_and_rotation_needs_the_current_one() {
        let mut ca = CaStore::default();
        assert!(ca.rotate(5, None, &root("a"), None, 10));
        // A second "first root" (another leader's) is refused.
        assert!(!ca.rotate(6, None, &root("b"), None, 10));
        assert!(!ca.rotate(6, Some("x"), &root("b"), None, 10));
        let mut b = root("b");
        b.intermediate_cert_pems = vec!["cross".into()];
        b.cross_signed_by = Some("a".into());
        assert!(ca.rotate(7, Some("a"), &b, None, 20));
        assert_eq!(ca.active().map(|r| r.id.as_str()), Some("b"));
        assert_eq!(ca.roots.len(), 2);
        assert_eq!(ca.roots[0].rotated_out_unix, Some(20));
        assert_eq!(ca.index, 7);
        // The active root cannot be pruned; the old one can, and the
        // cross-signed certificate goes with it.
        assert!(!ca.prune(8, &["b".into()]));
        assert!(ca.prune(8, &["a".into()]));
        assert_eq!(ca.roots.len(), 1);
        assert!(ca.roots[0].intermediate_cert_pems.is_empty());
    }

    #[test]
    fn a_root_remembers_the_longest_leaf_lifetime_it_signed_with() {
        let mut ca = CaStore::default();
        let long = CaConfig {
            leaf_cert_ttl_secs: 72 * 3600,
            ..CaConfig::default()
        };
        assert!(ca.rotate(1, None, &root("a"), Some(&long), 0));
        assert_eq!(ca.roots[0].max_leaf_ttl_secs, 72 * 3600);
        let short = CaConfig {
            leaf_cert_ttl_secs: 2,
            ..CaConfig::default()
        };
        ca.set_config(2, &short);
        assert_eq!(ca.roots[0].max_leaf_ttl_secs, 72 * 3600, "never shrinks");
        let mut b = root("b");
        b.cross_signed_by = Some("a".into());
        b.intermediate_cert_pems = vec!["b by a".into()];
        assert!(ca.rotate(3, Some("a"), &b, None, 10));
        assert_eq!(ca.roots[1].max_leaf_ttl_secs, 2, "the new root's own");
        let mut c = root("c");
        c.cross_signed_by = Some("b".into());
        c.intermediate_cert_pems = vec!["c by b".into()];
        assert!(ca.rotate(4, Some("b"), &c, None, 20));
        // Pruning a keeps c's cross-signature by b (still trusted).
        assert!(ca.prune(5, &["a".into()]));
        assert!(
            ca.roots
                .iter()
                .any(|r| r.id == "c" && !r.intermediate_cert_pems.is_empty())
        );
    }

    #[test]
    fn a_root_from_an_earlier_version_keeps_the_default_leaf_lifetime() {
        let mut ca = CaStore::default();
        let mut old = root("old");
        old.active = true;
        old.create_index = 1;
        ca.roots.push(old);
        ca.config.leaf_cert_ttl_secs = 60;
        let short = CaConfig {
            leaf_cert_ttl_secs: 2,
            ..CaConfig::default()
        };
        ca.set_config(9, &short);
        assert_eq!(ca.roots[0].max_leaf_ttl_secs, 72 * 3600);
    }

    #[test]
    fn debug_never_shows_the_key() {
        assert!(!format!("{:?}", root("a")).contains("SECRET"));
    }
}
