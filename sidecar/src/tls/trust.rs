//! What the mesh trusts and how a peer is checked against it: [`Trust`]
//! holds the CA roots (and the cross-signed intermediates a rotation
//! brings) from the registry's `ca_roots` topic; [`Trust::verify`] checks a
//! peer's chain against any of them and reads its SPIFFE ID; the rustls
//! verifiers ([`InboundVerifier`] for the inbound listeners' client
//! certificates, [`OutboundVerifier`] for the sidecars dialled) call it.
//! No hostname is ever checked: the identity is the URI SAN.
//!
//! [`reason`] turns a failed handshake into one of a few bounded metric
//! labels.

use std::sync::Arc;
use std::time::Duration;

use meshwork_proto::v1::CaRoots;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use super::spiffe::{self, SpiffeId};

/// The roots and settings of the mesh CA, as of one `ca_roots` change.
#[derive(Debug)]
pub struct Trust {
    /// `<cluster-id>.meshwork`: peers' SPIFFE IDs must be in it.
    pub trust_domain: String,
    /// The root that signs new leaves: a leaf signed by another is renewed.
    pub active_root_id: String,
    /// Every root trusted, by id.
    pub root_ids: Vec<String>,
    anchors: Vec<TrustAnchor<'static>>,
    /// Cross-signed roots, offered to path building beside what the peer
    /// presents.
    intermediates: Vec<CertificateDer<'static>>,
    /// No intention matches: allow (true) or deny.
    pub default_allow: bool,
    /// A leaf's lifetime as the CA issues them (0: not said).
    pub leaf_ttl: Duration,
}

/// Why a `CaRoots` message cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("the CA roots carry no trust domain")]
    NoTrustDomain,
    #[error("no usable root among {0} sent")]
    NoRoots(usize),
}

/// A root or intermediate PEM as DER certificates (each PEM may hold
/// several).
fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
}

impl Trust {
    /// The trust a `ca_roots` change describes. A root whose certificate
    /// cannot be read is left out (and said); none left is an error.
    pub fn from_roots(roots: &CaRoots) -> Result<Self, TrustError> {
        if roots.trust_domain.is_empty() {
            return Err(TrustError::NoTrustDomain);
        }
        let mut anchors = Vec::new();
        let mut intermediates = Vec::new();
        let mut root_ids = Vec::new();
        for root in &roots.roots {
            let anchor = pem_certs(&root.root_cert_pem)
                .ok()
                .and_then(|certs| certs.into_iter().next())
                .and_then(|der| {
                    webpki::anchor_from_trusted_cert(&der)
                        .ok()
                        .map(|a| a.to_owned())
                });
            let Some(anchor) = anchor else {
                tracing::warn!(root = %root.id, "a CA root's certificate cannot be read; not trusted");
                continue;
            };
            anchors.push(anchor);
            root_ids.push(root.id.clone());
            for pem in &root.intermediate_cert_pems {
                match pem_certs(pem) {
                    Ok(certs) => intermediates.extend(certs),
                    Err(_) => {
                        tracing::warn!(root = %root.id, "a cross-signed certificate cannot be read; left out");
                    }
                }
            }
        }
        if anchors.is_empty() {
            return Err(TrustError::NoRoots(roots.roots.len()));
        }
        Ok(Trust {
            trust_domain: roots.trust_domain.to_ascii_lowercase(),
            active_root_id: roots.active_root_id.clone(),
            root_ids,
            anchors,
            intermediates,
            default_allow: roots.default_intention != "deny",
            leaf_ttl: Duration::from_secs(roots.leaf_ttl_secs),
        })
    }

    /// Checks `end_entity` (with what the peer presented) chains to one of
    /// the roots at `now` for `usage`, and that its SPIFFE ID is in the
    /// trust domain and, when given, names `service`. Errors are rustls's,
    /// as a verifier returns them ([`reason`] classifies them).
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        presented: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        service: Option<&str>,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let mut intermediates: Vec<CertificateDer<'_>> =
            Vec::with_capacity(presented.len() + self.intermediates.len());
        intermediates.extend(presented.iter().map(|c| CertificateDer::from(c.as_ref())));
        intermediates.extend(
            self.intermediates
                .iter()
                .map(|c| CertificateDer::from(c.as_ref())),
        );
        cert.verify_for_usage(
            super::provider().signature_verification_algorithms.all,
            &self.anchors,
            &intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::InvalidCertificate(certificate_error(e)))?;
        let id = spiffe::of_certificate(end_entity).map_err(|e| bad_identity(&e))?;
        id.check(&self.trust_domain, service)
            .map_err(|e| bad_identity(&e))?;
        Ok(id)
    }
}

/// A chain that verified but does not name whom it should.
fn bad_identity(e: &spiffe::IdentityError) -> rustls::Error {
    tracing::debug!(error = %e, "peer certificate refused");
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

fn certificate_error(e: webpki::Error) -> CertificateError {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    }
}

/// The bounded label of a failed handshake for
/// `meshwork_sidecar_tls_handshake_failures_total{reason}`.
pub fn reason(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(tls) => reason_of(tls),
        None => match e.kind() {
            std::io::ErrorKind::InvalidData => "protocol",
            _ => "other",
        },
    }
}

/// [`reason`] of a rustls error itself.
pub fn reason_of(tls: &rustls::Error) -> &'static str {
    use rustls::AlertDescription as A;
    use rustls::Error as R;
    match tls {
        R::NoCertificatesPresented | R::AlertReceived(A::CertificateRequired) => "no_client_cert",
        R::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)
        | R::AlertReceived(A::UnknownCA) => "unknown_ca",
        R::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        )
        | R::AlertReceived(A::CertificateExpired) => "expired",
        R::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure
            | CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }
            | CertificateError::InvalidPurpose
            | CertificateError::InvalidPurposeContext { .. },
        )
        | R::AlertReceived(A::BadCertificate | A::AccessDenied) => "bad_identity",
        R::InvalidMessage(_)
        | R::InappropriateMessage { .. }
        | R::InappropriateHandshakeMessage { .. }
        | R::PeerIncompatible(_)
        | R::PeerMisbehaved(_)
        | R::NoApplicationProtocol
        | R::AlertReceived(_) => "protocol",
        _ => "other",
    }
}

/// Every reason [`reason`] gives, for rendering zeros.
pub const REASONS: [&str; 6] = [
    "no_client_cert",
    "unknown_ca",
    "bad_identity",
    "expired",
    "protocol",
    "other",
];

fn signature_schemes() -> Vec<SignatureScheme> {
    super::provider()
        .signature_verification_algorithms
        .supported_schemes()
}

fn tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &super::provider().signature_verification_algorithms,
    )
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &super::provider().signature_verification_algorithms,
    )
}

/// The inbound listeners' check of a client: a certificate is required,
/// must chain to a current root and carry a SPIFFE ID of the trust domain
/// (any service: which may call is the intentions' business).
#[derive(Debug)]
pub struct InboundVerifier {
    pub(super) trust: Arc<Trust>,
}

impl ClientCertVerifier for InboundVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_schemes()
    }
}

/// The check of a sidecar dialled for an upstream: its chain to a current
/// root and its SPIFFE ID naming the upstream's service (any dc). The
/// server name (an IP address) is not looked at.
#[derive(Debug)]
pub struct OutboundVerifier {
    pub(super) trust: Arc<Trust>,
    pub(super) service: String,
}

impl ServerCertVerifier for OutboundVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(&self.service),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use meshwork_proto::v1::CaRoot;

    /// A test CA: its root certificate and a way to sign leaves.
    pub(crate) struct TestCa {
        pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pub pem: String,
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> Self {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let cert = params.self_signed(&key).expect("root");
            TestCa {
                pem: cert.pem(),
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// A leaf for `uri` valid between the two years; its chain (PEM)
        /// and key (PKCS#8 DER).
        pub(crate) fn leaf_between(&self, uri: &str, from: i32, to: i32) -> (String, Vec<u8>) {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("ia5"))];
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).expect("leaf");
            (cert.pem(), key.serialize_der())
        }

        pub(crate) fn leaf(&self, uri: &str) -> (String, Vec<u8>) {
            self.leaf_between(uri, 2020, 4000)
        }

        pub(crate) fn roots(&self, td: &str) -> CaRoots {
            CaRoots {
                trust_domain: td.into(),
                active_root_id: "root-1".into(),
                roots: vec![CaRoot {
                    id: "root-1".into(),
                    name: "test".into(),
                    root_cert_pem: self.pem.clone(),
                    intermediate_cert_pems: vec![],
                    active: true,
                    not_after_unix: 0,
                }],
                default_intention: "allow".into(),
                leaf_ttl_secs: 3600,
            }
        }
    }

    fn first(pem: &str) -> CertificateDer<'static> {
        pem_certs(pem).expect("pem").remove(0)
    }

    const TD: &str = "c0ffee.meshwork";

    fn check(trust: &Trust, pem: &str, service: Option<&str>) -> Result<SpiffeId, rustls::Error> {
        trust.verify(
            &first(pem),
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            service,
        )
    }

    #[test]
    fn a_leaf_of_the_mesh_ca_naming_the_service_is_accepted() {
        let ca = TestCa::new("mesh");
        let trust = Trust::from_roots(&ca.roots(TD)).expect("trust");
        let (pem, _) = ca.leaf(&format!("spiffe://{TD}/ns/default/dc/dc1/svc/api"));
        let id = check(&trust, &pem, Some("api")).expect("accepted");
        assert_eq!(id.service, "api");
        assert!(check(&trust, &pem, None).is_ok());
        let (pem, _) = ca.leaf(&format!("spiffe://{TD}/ns/default/dc/dc9/svc/api"));
        assert!(check(&trust, &pem, Some("api")).is_ok(), "any dc");
    }

    fn refused_as(trust: &Trust, pem: &str, service: Option<&str>) -> &'static str {
        let e = check(trust, pem, service).expect_err("refused");
        reason(&std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn foreign_wrong_and_expired_leaves_are_refused() {
        let ca = TestCa::new("mesh");
        let trust = Trust::from_roots(&ca.roots(TD)).expect("trust");
        let other = TestCa::new("other");
        let api = format!("spiffe://{TD}/ns/default/dc/dc1/svc/api");
        let (foreign, _) = other.leaf(&api);
        assert_eq!(refused_as(&trust, &foreign, Some("api")), "unknown_ca");
        let (web, _) = ca.leaf(&format!("spiffe://{TD}/ns/default/dc/dc1/svc/web"));
        assert_eq!(refused_as(&trust, &web, Some("api")), "bad_identity");
        let (elsewhere, _) = ca.leaf("spiffe://other.meshwork/ns/default/dc/dc1/svc/api");
        assert_eq!(refused_as(&trust, &elsewhere, Some("api")), "bad_identity");
        assert_eq!(refused_as(&trust, &elsewhere, None), "bad_identity");
        let (expired, _) = ca.leaf_between(&api, 2001, 2002);
        assert_eq!(refused_as(&trust, &expired, Some("api")), "expired");
        let (future, _) = ca.leaf_between(&api, 3999, 4000);
        assert_eq!(refused_as(&trust, &future, Some("api")), "expired");
    }

    #[test]
    fn every_listed_root_is_trusted_and_unreadable_ones_are_skipped() {
        let old = TestCa::new("old");
        let new = TestCa::new("new");
        let mut roots = new.roots(TD);
        roots.roots.push(CaRoot {
            id: "root-0".into(),
            root_cert_pem: old.pem.clone(),
            ..roots.roots[0].clone()
        });
        roots.roots.push(CaRoot {
            id: "junk".into(),
            root_cert_pem: "not a pem".into(),
            ..roots.roots[0].clone()
        });
        let trust = Trust::from_roots(&roots).expect("trust");
        assert_eq!(trust.root_ids, ["root-1", "root-0"]);
        let uri = format!("spiffe://{TD}/ns/default/dc/dc1/svc/api");
        assert!(check(&trust, &old.leaf(&uri).0, Some("api")).is_ok());
        assert!(check(&trust, &new.leaf(&uri).0, Some("api")).is_ok());
        roots.roots.truncate(0);
        assert!(matches!(
            Trust::from_roots(&roots),
            Err(TrustError::NoRoots(0))
        ));
        roots.trust_domain.clear();
        assert!(matches!(
            Trust::from_roots(&roots),
            Err(TrustError::NoTrustDomain)
        ));
    }
}
