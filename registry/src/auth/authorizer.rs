//! A token's policies compiled into one lookup table per resource: the
//! answer to "may this token do that to this name?".
//!
//! Consul's evaluation: an exact rule for the name wins; else the longest
//! prefix rule covering it; else the default policy. Where two policies
//! give the same rule, deny wins, then the more permissive.

use std::collections::HashMap;

use super::rules::{Access, Kind, Need, Rule, Rules, Single};

/// What applies where no rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Everything but ACL management and snapshots (Consul's `allow`).
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default)]
struct Table {
    exact: HashMap<String, Access>,
    /// Longest first.
    prefixes: Vec<(String, Access)>,
}

impl Table {
    fn add(&mut self, rule: &Rule) {
        if rule.prefix {
            match self.prefixes.iter_mut().find(|(p, _)| *p == rule.name) {
                Some((_, access)) => *access = access.merge(rule.access),
                None => self.prefixes.push((rule.name.clone(), rule.access)),
            }
        } else {
            self.exact
                .entry(rule.name.clone())
                .and_modify(|a| *a = a.merge(rule.access))
                .or_insert(rule.access);
        }
    }

    fn seal(&mut self) {
        self.prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    }

    fn lookup(&self, name: &str) -> Option<Access> {
        if let Some(access) = self.exact.get(name) {
            return Some(*access);
        }
        self.prefixes
            .iter()
            .find(|(p, _)| name.starts_with(p.as_str()))
            .map(|(_, a)| *a)
    }

    /// The prefix rule that governs a whole tree under `prefix`: the
    /// longest prefix rule covering it. An exact rule for the name
    /// `prefix` governs that one key only, never the names below it.
    fn lookup_tree(&self, prefix: &str) -> Option<Access> {
        self.prefixes
            .iter()
            .find(|(p, _)| prefix.starts_with(p.as_str()))
            .map(|(_, a)| *a)
    }

    /// Whether any rule for a name under `prefix` (other than `prefix`
    /// itself as a prefix rule) withholds `need`.
    fn any_below_withholds(&self, prefix: &str, need: Need) -> bool {
        self.exact
            .iter()
            .any(|(name, a)| name.starts_with(prefix) && !a.grants(need))
            || self
                .prefixes
                .iter()
                .any(|(p, a)| p.len() > prefix.len() && p.starts_with(prefix) && !a.grants(need))
    }
}

/// The compiled rules of one token.
#[derive(Debug, Clone)]
pub struct Authorizer {
    tables: [Table; Kind::ALL.len()],
    singles: [Option<Access>; Single::ALL.len()],
    fallback: Fallback,
    /// Grants everything (ACLs off): no lookups.
    all: bool,
    /// Per kind: whether every name may be read (so a list needs no
    /// per-item check).
    reads_all: [bool; Kind::ALL.len()],
}

fn kind_slot(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

fn single_slot(single: Single) -> usize {
    Single::ALL.iter().position(|s| *s == single).unwrap_or(0)
}

impl Authorizer {
    /// Grants everything: what every request is when ACLs are off.
    pub fn everything() -> Self {
        Self {
            tables: Default::default(),
            singles: [None; Single::ALL.len()],
            fallback: Fallback::Allow,
            all: true,
            reads_all: [true; Kind::ALL.len()],
        }
    }

    /// Compiles the rules of a token's policies over `fallback`.
    pub fn compile<'a>(rules: impl IntoIterator<Item = &'a Rules>, fallback: Fallback) -> Self {
        let mut authorizer = Self {
            tables: Default::default(),
            singles: [None; Single::ALL.len()],
            fallback,
            all: false,
            reads_all: [false; Kind::ALL.len()],
        };
        for rules in rules {
            for rule in &rules.rules {
                authorizer.tables[kind_slot(rule.kind)].add(rule);
            }
            for (single, access) in &rules.singles {
                let slot = &mut authorizer.singles[single_slot(*single)];
                *slot = Some(slot.map_or(*access, |a| a.merge(*access)));
            }
        }
        for table in &mut authorizer.tables {
            table.seal();
        }
        for kind in Kind::ALL {
            authorizer.reads_all[kind_slot(kind)] = authorizer.allows_prefix(kind, "", Need::Read);
        }
        authorizer
    }

    /// Whether every name of `kind` may be read.
    pub fn reads_all(&self, kind: Kind) -> bool {
        self.reads_all[kind_slot(kind)]
    }

    /// Whether `need` on `name` is granted.
    pub fn allows(&self, kind: Kind, name: &str, need: Need) -> bool {
        if self.all {
            return true;
        }
        match self.tables[kind_slot(kind)].lookup(name) {
            Some(access) => access.grants(need),
            None => self.fallback == Fallback::Allow,
        }
    }

    /// Whether `need` is granted on every name under `prefix` (Consul's
    /// `KeyWritePrefix`, for deleting a tree).
    pub fn allows_prefix(&self, kind: Kind, prefix: &str, need: Need) -> bool {
        if self.all {
            return true;
        }
        let table = &self.tables[kind_slot(kind)];
        let tree = match table.lookup_tree(prefix) {
            Some(access) => access.grants(need),
            None => self.fallback == Fallback::Allow,
        };
        tree && !table.any_below_withholds(prefix, need)
    }

    /// Whether `need` on a resource with one rule is granted. `mesh` and
    /// `peering` fall back to `operator`; `acl` is never granted by the
    /// default policy, only by a rule (Consul's management rights).
    pub fn allows_single(&self, single: Single, need: Need) -> bool {
        if self.all {
            return true;
        }
        let own = self.singles[single_slot(single)];
        let rule = match single {
            Single::Mesh | Single::Peering => own.or(self.singles[single_slot(Single::Operator)]),
            _ => own,
        };
        match rule {
            Some(access) => access.grants(need),
            None => single != Single::Acl && self.fallback == Fallback::Allow,
        }
    }

    /// Whether this grants everything: ACLs off, or `acl = "write"`
    /// (management), which no other rule can hide anything from.
    pub fn is_management(&self) -> bool {
        self.all || self.allows_single(Single::Acl, Need::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::parse;
    use super::*;

    fn authz(texts: &[&str], fallback: Fallback) -> Authorizer {
        let rules: Vec<Rules> = texts.iter().map(|t| parse(t).expect("rules")).collect();
        Authorizer::compile(&rules, fallback)
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let a = authz(
            &[r#"
key_prefix "" { policy = "read" }
key_prefix "app/" { policy = "write" }
key_prefix "app/secret/" { policy = "deny" }
key "app/secret/open" { policy = "read" }
"#],
            Fallback::Deny,
        );
        assert!(a.allows(Kind::Key, "other", Need::Read));
        assert!(!a.allows(Kind::Key, "other", Need::Write));
        assert!(a.allows(Kind::Key, "app/x", Need::Write));
        assert!(!a.allows(Kind::Key, "app/secret/x", Need::Read));
        assert!(a.allows(Kind::Key, "app/secret/open", Need::Read));
        assert!(!a.allows(Kind::Key, "app/secret/open", Need::Write));
        assert!(!a.allows(Kind::Service, "web", Need::Read), "default deny");
        assert!(
            !a.allows_prefix(Kind::Key, "app/", Need::Write),
            "a deny below"
        );
        assert!(a.allows_prefix(Kind::Key, "app/x/", Need::Write));
    }

    #[test]
    fn deny_wins_between_policies_then_the_most_permissive() {
        let a = authz(
            &[
                r#"key_prefix "a/" { policy = "read" }"#,
                r#"key_prefix "a/" { policy = "write" }"#,
                r#"service "db" { policy = "write" }"#,
                r#"service "db" { policy = "deny" }"#,
            ],
            Fallback::Allow,
        );
        assert!(a.allows(Kind::Key, "a/1", Need::Write));
        assert!(!a.allows(Kind::Service, "db", Need::Read));
        assert!(a.allows(Kind::Service, "web", Need::Write), "default allow");
    }

    #[test]
    fn singles_and_their_fallbacks() {
        let allow = authz(&[""], Fallback::Allow);
        assert!(allow.allows_single(Single::Operator, Need::Write));
        assert!(
            !allow.allows_single(Single::Acl, Need::Read),
            "acl needs a rule"
        );
        let ops = authz(&[r#"operator = "read""#], Fallback::Deny);
        assert!(
            ops.allows_single(Single::Mesh, Need::Read),
            "mesh follows operator"
        );
        assert!(!ops.allows_single(Single::Mesh, Need::Write));
        assert!(!ops.allows_single(Single::Keyring, Need::Read));
        let manage = authz(&[crate::state::acl::MANAGEMENT_RULES], Fallback::Deny);
        assert!(manage.is_management());
        assert!(manage.allows_prefix(Kind::Key, "", Need::Write));
        assert!(manage.allows(Kind::Intention, "web", Need::Write));
        assert!(!ops.is_management());
    }

    #[test]
    fn list_grants_read_and_list_only() {
        let a = authz(&[r#"key_prefix "l/" { policy = "list" }"#], Fallback::Deny);
        assert!(a.allows(Kind::Key, "l/x", Need::List));
        assert!(a.allows(Kind::Key, "l/x", Need::Read));
        assert!(!a.allows(Kind::Key, "l/x", Need::Write));
    }
}
