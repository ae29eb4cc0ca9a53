//! Where leaves are signed: on the leader. A server that does not lead
//! forwards the CSR over the internal service (`RaftInternal.SignLeaf`);
//! the caller's rights were checked where the request came in. The
//! leader signs once its state holds everything committed, so a leaf is
//! never signed by a root that a committed rotation already replaced.

use meshwork_proto::v1::{ErrorKind, ForwardSignLeafReply, ForwardSignLeafRequest};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::time::Instant;

use super::{CaError, Leaf};
use crate::cluster::with_leader::{Leader, with_leader};
use crate::cluster::{ClusterError, RegistryNode, WriteAttempt, answered, time_left};
use crate::raft::directory::PROTOCOL_SIGN_FORWARD;

/// Largest CSR accepted (checked before it is forwarded).
pub const MAX_CSR: usize = 16 * 1024;

/// Why a leaf was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CA refused (a bad CSR, no root yet, …).
    #[error(transparent)]
    Ca(#[from] CaError),
    /// No leader answered in time, or the cluster failed otherwise.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// What a leaf is signed for, as the request that came in says.
#[derive(Debug, Clone, Copy)]
pub struct LeafRequest<'a> {
    pub datacenter: &'a str,
    pub service: &'a str,
    pub csr_pem: &'a str,
}

/// A signed leaf and the CA state's index it was signed at.
pub type Signed = (Leaf, u64);

impl RegistryNode {
    /// Has the leader sign a leaf from `request.csr_pem` (forwarded when
    /// this server does not lead).
    pub async fn sign_leaf(&self, request: LeafRequest<'_>) -> Result<Signed, SignError> {
        super::valid_service_name(request.service).map_err(CaError::Csr)?;
        if request.csr_pem.len() > MAX_CSR {
            return Err(CaError::Csr(format!("larger than {} KiB", MAX_CSR / 1024)).into());
        }
        let deadline = Instant::now() + self.leader_wait;
        let signed = with_leader(self, deadline, self.leader_wait, |to| async move {
            match to {
                Leader::Here => self.sign_leaf_local(request).await,
                Leader::There(addr) => self.sign_leaf_remote(&addr, request, deadline).await,
            }
        })
        .await?;
        Ok(signed?)
    }

    /// On the leader: signs with the active root of a current state, once
    /// a quorum has lately confirmed this server still leads (a leader cut
    /// off from the others must not sign with a root they rotated out).
    pub(crate) async fn sign_leaf_local(
        &self,
        request: LeafRequest<'_>,
    ) -> Result<Result<Signed, CaError>, WriteAttempt> {
        let deadline = Instant::now() + self.leader_wait;
        if !self.is_leader() {
            return Err(WriteAttempt::Retry);
        }
        self.confirm_leadership(deadline).await?;
        self.wait_current_as_leader(deadline).await?;
        Ok(self.sign_here(request))
    }

    /// Signs with this server's own replica (what every server did before
    /// the leader signed: used while the leader runs an older version).
    fn sign_here(&self, request: LeafRequest<'_>) -> Result<Signed, CaError> {
        let state = self.state.read();
        let signed = super::leaf_from_state(
            &state,
            request.datacenter,
            request.service,
            Some(request.csr_pem),
        );
        let index = state.ca.index;
        drop(state);
        signed.map(|leaf| {
            crate::metrics::METRICS
                .leaves_signed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(service = %leaf.service, serial = %leaf.serial, "leaf signed");
            (leaf, index)
        })
    }

    async fn sign_leaf_remote(
        &self,
        leader_addr: &str,
        request: LeafRequest<'_>,
        deadline: Instant,
    ) -> Result<Result<Signed, CaError>, WriteAttempt> {
        let leader_too_old = self
            .leader()
            .filter(|(_, addr)| addr == leader_addr)
            .and_then(|(id, _)| self.channels.directory.get(id))
            .is_some_and(|info| info.protocol < PROTOCOL_SIGN_FORWARD);
        if leader_too_old {
            // A leader of an older version (a rolling upgrade) has no
            // SignLeaf: sign here, as that version does.
            return Ok(self.sign_here(request));
        }
        let mut client = self.leader_client(leader_addr)?;
        let mut call = self.channels.request(ForwardSignLeafRequest {
            service: request.service.to_owned(),
            csr_pem: request.csr_pem.to_owned(),
            datacenter: request.datacenter.to_owned(),
        });
        call.set_timeout(time_left(deadline));
        let answer = self
            .unless_replaced(leader_addr, client.sign_leaf(call))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable("the leader was replaced")));
        match answer {
            Ok(reply) => reply_to_leaf(reply.into_inner()),
            Err(status) => match status.code() {
                tonic::Code::Unimplemented => Ok(self.sign_here(request)),
                // Signing has no side effect: a failure to reach the
                // leader is worth another try (it may have moved).
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown => Err(WriteAttempt::Retry),
                _ => Err(WriteAttempt::Failed(ClusterError::Internal(format!(
                    "the leader refused to sign: {}",
                    status.message()
                )))),
            },
        }
    }
}

/// The leader's answer to a forwarded CSR, as the wire carries it.
pub fn leaf_reply(result: Result<Result<Signed, CaError>, WriteAttempt>) -> ForwardSignLeafReply {
    let mut reply = ForwardSignLeafReply::default();
    match result {
        Ok(Ok((leaf, index))) => match serde_json::to_vec(&leaf) {
            Ok(bytes) => {
                reply.leaf = bytes;
                reply.ca_index = index;
            }
            Err(e) => {
                reply.error = format!("cannot encode the leaf: {e}");
                reply.kind = ErrorKind::Other.into();
            }
        },
        Ok(Err(refusal)) => {
            reply.ca_refusal = match refusal {
                CaError::NotReady => "not_ready",
                CaError::Csr(_) => "csr",
                CaError::Root(_) => "root",
                CaError::Sign(_) => "sign",
            }
            .to_owned();
            reply.error = match refusal {
                CaError::NotReady => String::new(),
                CaError::Csr(m) | CaError::Root(m) | CaError::Sign(m) => m,
            };
        }
        Err(attempt) => {
            let (kind, error) = attempt.to_wire();
            reply.error = error;
            reply.kind = kind.into();
        }
    }
    reply
}

fn reply_to_leaf(reply: ForwardSignLeafReply) -> Result<Result<Signed, CaError>, WriteAttempt> {
    answered(reply.kind(), reply.error.clone())?;
    let refusal = match reply.ca_refusal.as_str() {
        "" => None,
        "not_ready" => Some(CaError::NotReady),
        "csr" => Some(CaError::Csr(reply.error)),
        "root" => Some(CaError::Root(reply.error)),
        _ => Some(CaError::Sign(reply.error)),
    };
    if let Some(refusal) = refusal {
        return Ok(Err(refusal));
    }
    let leaf: Leaf = serde_json::from_slice(&reply.leaf).map_err(|e| {
        WriteAttempt::Failed(ClusterError::Internal(format!(
            "the leader's leaf does not decode: {e}"
        )))
    })?;
    Ok(Ok((leaf, reply.ca_index)))
}

/// A new ECDSA P-256 key and a CSR for it (PEM both), for callers that do
/// not make their own key (`/v1/agent/connect/ca/leaf/:service`): the key
/// stays on this server, only the CSR goes to the leader.
pub fn key_and_csr() -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(format!("cannot generate a key: {e}")))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| CaError::Sign(format!("cannot make a CSR: {e}")))?;
    Ok((key.serialize_pem(), csr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf() -> Leaf {
        Leaf {
            cert_pem: "C".into(),
            chain_pem: "CC".into(),
            serial: "01".into(),
            spiffe_id: "spiffe://x.meshwork/ns/default/dc/dc1/svc/api".into(),
            service: "api".into(),
            valid_after_unix: 1,
            valid_before_unix: 2,
            root_id: "r".into(),
            private_key_pem: Some("SECRET".into()),
        }
    }

    #[test]
    fn a_forwarded_leaf_round_trips_without_its_key() {
        let reply = leaf_reply(Ok(Ok((leaf(), 7))));
        assert!(!String::from_utf8_lossy(&reply.leaf).contains("SECRET"));
        let Ok(Ok((back, index))) = reply_to_leaf(reply) else {
            panic!("the leaf should decode");
        };
        assert_eq!((back.serial.as_str(), index), ("01", 7));
        assert!(back.private_key_pem.is_none());
    }

    #[test]
    fn refusals_keep_their_kind_and_no_leader_is_retried() {
        let reply = leaf_reply(Ok(Err(CaError::Csr("bad".into()))));
        assert!(matches!(reply_to_leaf(reply), Ok(Err(CaError::Csr(m))) if m == "bad"));
        let reply = leaf_reply(Ok(Err(CaError::NotReady)));
        assert!(matches!(reply_to_leaf(reply), Ok(Err(CaError::NotReady))));
        let reply = leaf_reply(Err(WriteAttempt::Retry));
        assert!(matches!(reply_to_leaf(reply), Err(WriteAttempt::Retry)));
    }

    #[test]
    fn a_made_key_comes_with_a_csr_the_ca_signs() {
        let (key, csr) = key_and_csr().expect("a key and a CSR");
        assert!(key.contains("PRIVATE KEY") && csr.contains("CERTIFICATE REQUEST"));
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&csr).is_ok());
    }
}
