//! This sidecar's leaf certificate: a fresh ECDSA P-256 key and a CSR for
//! each signing ([`Request`]), the registry's answer checked and kept with
//! its key ([`Leaf`]), and when to renew it ([`renew_after`], a pure
//! function). The key never leaves the process and is never printed:
//! [`Leaf`]'s `Debug` shows what a log may.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshwork_proto::v1::SignLeafReply;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::spiffe::{self, SpiffeId};

/// A key and its CSR, made before asking the registry to sign.
pub struct Request {
    key: PrivatePkcs8KeyDer<'static>,
    /// PEM, for `SignLeafRequest.csr_pem`.
    pub csr_pem: String,
    /// The public key (SubjectPublicKeyInfo DER) the leaf must carry.
    public_key: Vec<u8>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// Why a leaf could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("cannot make a key or CSR: {0}")]
    Key(#[source] rcgen::Error),
    #[error("the registry's certificate chain is not PEM certificates")]
    BadChain,
    #[error("the registry's leaf is not for this sidecar's key")]
    WrongKey,
    #[error("the registry's leaf: {0}")]
    Identity(#[source] spiffe::IdentityError),
    #[error("the registry's leaf is for service {found:?}, not {expected:?}")]
    WrongService { found: String, expected: String },
}

impl Request {
    /// A new P-256 key and a CSR naming `service` (the registry keeps only
    /// the public key and writes the identity itself).
    pub fn new(service: &str) -> Result<Self, LeafError> {
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(LeafError::Key)?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(LeafError::Key)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, service);
        let csr = params.serialize_request(&key).map_err(LeafError::Key)?;
        Ok(Request {
            csr_pem: csr.pem().map_err(LeafError::Key)?,
            public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// The leaf the registry signed for this request, checked: a chain of
    /// certificates whose first carries this key and `service`'s SPIFFE ID.
    pub fn accept(self, reply: SignLeafReply, service: &str) -> Result<Leaf, LeafError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(reply.cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|_| LeafError::BadChain)?;
        let first = chain.first().ok_or(LeafError::BadChain)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(first.as_ref()).map_err(|_| LeafError::BadChain)?;
        if parsed.public_key().raw != self.public_key.as_slice() {
            return Err(LeafError::WrongKey);
        }
        let id = spiffe::of_certificate(first).map_err(LeafError::Identity)?;
        if id.service != service {
            return Err(LeafError::WrongService {
                found: id.service,
                expected: service.to_owned(),
            });
        }
        Ok(Leaf {
            chain,
            key: self.key,
            spiffe_id: id,
            serial: reply.serial,
            valid_after_unix: reply.valid_after_unix,
            valid_before_unix: reply.valid_before_unix,
            root_id: reply.root_id,
            index: reply.index,
        })
    }
}

/// A signed leaf and its key.
pub struct Leaf {
    /// The leaf first, then what chains it to a root.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    pub spiffe_id: SpiffeId,
    pub serial: String,
    pub valid_after_unix: i64,
    pub valid_before_unix: i64,
    /// The root that signed it.
    pub root_id: String,
    pub index: u64,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("spiffe_id", &self.spiffe_id.uri())
            .field("serial", &self.serial)
            .field("valid_before_unix", &self.valid_before_unix)
            .field("root_id", &self.root_id)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// The private key, for a rustls config.
    pub(super) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Seconds until it expires (negative once it has).
    pub fn expires_in(&self, now_unix: i64) -> i64 {
        self.valid_before_unix - now_unix
    }
}

/// Seconds since the Unix epoch now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Where in a leaf's life it is renewed: 60 %, give or take `jitter`
/// (a fraction, e.g. ±0.1 of those 60 %) so a fleet signed at once does
/// not come back at once.
const RENEW_AT: f64 = 0.6;

/// How long from `now` to wait before renewing a leaf valid from
/// `valid_after` to `valid_before` (Unix seconds), with `jitter` in
/// [-0.1, 0.1]: zero once that point has passed or for a leaf that makes
/// no sense (ending before it starts).
pub fn renew_after(valid_after: i64, valid_before: i64, now: i64, jitter: f64) -> Duration {
    let life = valid_before.saturating_sub(valid_after);
    if life <= 0 {
        return Duration::ZERO;
    }
    let jitter = jitter.clamp(-0.1, 0.1);
    let at = valid_after as f64 + life as f64 * RENEW_AT * (1.0 + jitter);
    let wait = at - now as f64;
    if wait <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(wait)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tls::trust::tests::TestCa;

    /// A leaf for `service` in trust domain `td`, signed by `ca` from a
    /// CSR as the registry would (root id `root-1`).
    pub(crate) fn signed(ca: &TestCa, td: &str, service: &str) -> Leaf {
        let request = Request::new(service).expect("request");
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&request.csr_pem).expect("csr");
        let mut params = csr.params;
        let uri = format!("spiffe://{td}/ns/default/dc/dc1/svc/{service}");
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.as_str().try_into().expect("ia5"))];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&csr.public_key, &ca.issuer)
            .expect("signed");
        let reply = SignLeafReply {
            cert_chain_pem: cert.pem(),
            spiffe_id: uri,
            serial: "01".into(),
            valid_after_unix: now_unix() - 60,
            valid_before_unix: now_unix() + 3600,
            root_id: "root-1".into(),
            index: 1,
        };
        request.accept(reply, service).expect("accepted")
    }

    #[test]
    fn renewal_comes_at_sixty_percent_of_the_life_within_the_jitter() {
        // A 72 h leaf signed at t=1000.
        let (after, before) = (1000, 1000 + 72 * 3600);
        let at = |now, jitter| renew_after(after, before, now, jitter).as_secs_f64();
        let near = |a: f64, b: f64| (a - b).abs() < 1e-3;
        let life = 72.0 * 3600.0;
        assert!(near(at(1000, 0.0), 0.6 * life));
        assert!(near(at(1000, 0.1), 0.66 * life));
        assert!(near(at(1000, -0.1), 0.54 * life));
        assert!(near(at(1000, 5.0), at(1000, 0.1)), "jitter is bounded");
        // Later, the wait is shorter; past the point, at once.
        assert!(near(at(1000 + 3600, 0.0), 0.6 * life - 3600.0));
        assert_eq!(at(before, 0.0), 0.0);
        assert_eq!(at(before + 10, -0.1), 0.0);
        // A nonsense validity: renew now.
        assert_eq!(renew_after(10, 10, 0, 0.0), Duration::ZERO);
        assert_eq!(renew_after(10, 5, 0, 0.0), Duration::ZERO);
    }

    #[test]
    fn csrs_carry_a_p256_key_and_replies_are_checked() {
        let ca = TestCa::new("mesh");
        let request = Request::new("web").expect("request");
        assert!(
            request
                .csr_pem
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );
        assert!(!format!("{request:?}").contains("BEGIN"), "no key in Debug");
        // The CA signs the CSR's key (as the registry does, ignoring the rest).
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&request.csr_pem).expect("csr");
        let mut params = csr.params;
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://td.meshwork/ns/default/dc/dc1/svc/web"
                .try_into()
                .expect("ia5"),
        )];
        let cert = params
            .signed_by(&csr.public_key, &ca.issuer)
            .expect("signed");
        let reply = SignLeafReply {
            cert_chain_pem: cert.pem(),
            spiffe_id: "spiffe://td.meshwork/ns/default/dc/dc1/svc/web".into(),
            serial: "0a:0b".into(),
            valid_after_unix: 1,
            valid_before_unix: 2,
            root_id: "root-1".into(),
            index: 7,
        };
        let leaf = request.accept(reply.clone(), "web").expect("accepted");
        assert_eq!(leaf.spiffe_id.service, "web");
        assert_eq!(leaf.serial, "0a:0b");
        assert!(!format!("{leaf:?}").contains("BEGIN"));
        // Not for another service, nor for another key.
        let other = Request::new("web").expect("request");
        assert!(matches!(
            Request::new("api")
                .expect("request")
                .accept(reply.clone(), "api"),
            Err(LeafError::WrongKey)
        ));
        assert!(matches!(
            other.accept(reply.clone(), "web"),
            Err(LeafError::WrongKey)
        ));
        let request = Request::new("web").expect("request");
        let junk = SignLeafReply {
            cert_chain_pem: "junk".into(),
            ..reply
        };
        assert!(matches!(
            request.accept(junk, "web"),
            Err(LeafError::BadChain)
        ));
    }
}
