//! The cluster's identity as this server knows it. The first leader of a
//! new cluster commits a random id ([`Command::SetClusterId`]); every
//! server records it in its data dir and stamps it on every internal RPC.
//! A server refuses Raft traffic stamped with another cluster's id, so a
//! data dir moved into the wrong cluster cannot mix two clusters' logs.
//!
//! [`Command::SetClusterId`]: crate::command::Command::SetClusterId

use std::sync::OnceLock;

use tonic::Status;
use tonic::metadata::MetadataValue;

/// gRPC metadata key carrying the sender's cluster id.
pub const CLUSTER_HEADER: &str = "x-meshwork-cluster";

/// Prefix of the error a server answers to another cluster's request.
pub const FOREIGN_CLUSTER: &str = "request from another cluster";

#[derive(Debug, Default)]
pub struct ClusterIdentity {
    id: OnceLock<String>,
}

impl ClusterIdentity {
    pub fn new(id: Option<String>) -> Self {
        let identity = Self::default();
        if let Some(id) = id {
            let _ = identity.id.set(id);
        }
        identity
    }

    pub fn get(&self) -> Option<&str> {
        self.id.get().map(String::as_str)
    }

    /// Records the id; false if a different one was already known.
    pub fn learn(&self, id: &str) -> bool {
        self.id.get_or_init(|| id.to_owned()) == id
    }

    /// A request carrying this server's cluster id (when known).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = self.get().and_then(|id| MetadataValue::try_from(id).ok()) {
            request.metadata_mut().insert(CLUSTER_HEADER, value);
        }
        request
    }

    /// Refuses a request stamped with another cluster's id.
    pub fn check<T>(&self, request: &tonic::Request<T>) -> Result<(), Status> {
        let theirs = request
            .metadata()
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok());
        match (self.get(), theirs) {
            (Some(ours), Some(theirs)) if ours != theirs => Err(Status::failed_precondition(
                format!("{FOREIGN_CLUSTER} ({theirs}); this server belongs to cluster {ours}"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_ids_are_refused_unknown_ones_pass() {
        let a = ClusterIdentity::new(Some("a".into()));
        let b = ClusterIdentity::new(Some("b".into()));
        let fresh = ClusterIdentity::default();
        assert!(a.check(&a.request(())).is_ok());
        assert!(a.check(&fresh.request(())).is_ok());
        assert!(fresh.check(&a.request(())).is_ok());
        let err = a.check(&b.request(())).expect_err("foreign");
        assert!(err.message().starts_with(FOREIGN_CLUSTER));
        assert!(fresh.learn("x"));
        assert!(!fresh.learn("y"));
    }
}
