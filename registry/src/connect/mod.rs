//! The mesh CA's certificates (Consul's built-in provider): roots made or
//! imported, cross-signed on rotation, and leaf certificates signed from a
//! sidecar's CSR — each with the service's SPIFFE ID as its only identity.
//! The replicated part (which roots exist, which is active) is
//! [`crate::state::ca`]; this module holds the clock and the randomness.
//!
//! The leader signs every leaf ([`sign`]: other servers forward the CSR),
//! with the active root of a state that holds everything committed: a
//! leaf is never signed with a root already rotated out, and the CA key
//! is used in one place at a time. A leaf is not a replicated object (as
//! in Consul).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::state::ca::{CaRoot, CaStore};

/// The trust domain of a cluster: `<cluster-id>.meshwork`.
pub fn trust_domain(cluster_id: &str) -> String {
    format!("{cluster_id}.meshwork")
}

/// A service's SPIFFE ID.
pub fn spiffe_id(trust_domain: &str, datacenter: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{service}")
}

/// Clock skew allowed for: a leaf is valid from a minute before it is
/// signed.
const BACKDATE_SECS: i64 = 60;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The mesh CA has no root yet (a fresh cluster's leader makes one on
    /// its first moments of leadership).
    #[error("the mesh CA is not ready yet (no root); try again shortly")]
    NotReady,
    #[error("invalid CSR: {0}")]
    Csr(String),
    #[error("invalid root: {0}")]
    Root(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn at(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| CaError::Sign(e.to_string()))
}

/// A random positive serial number of `N` bytes (16 for leaves; 8 for
/// roots, which Consul's API shows as a number).
fn random_serial<const N: usize>() -> (SerialNumber, String) {
    let mut bytes = [0u8; N];
    rand::fill(&mut bytes[..]);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    (SerialNumber::from_slice(&bytes), colon_hex(&bytes))
}

fn root_params(
    trust_domain: &str,
    common_name: &str,
    serial: SerialNumber,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.serial_number = Some(serial);
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name);
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let uri = format!("spiffe://{trust_domain}");
    params.subject_alt_names = vec![SanType::URI(
        uri.try_into().map_err(|e| CaError::Root(format!("{e}")))?,
    )];
    params.not_before = at(not_before)?;
    params.not_after = at(not_after)?;
    Ok(params)
}

fn issuer(root: &CaRoot) -> Result<Issuer<'static, KeyPair>, CaError> {
    let key = KeyPair::from_pem(&root.private_key_pem)
        .map_err(|_| CaError::Root(format!("root {}: its key cannot be read", root.id)))?;
    Issuer::from_ca_cert_pem(&root.root_cert_pem, key)
        .map_err(|e| CaError::Root(format!("root {}: {e}", root.id)))
}

/// Makes a new ECDSA P-256 root valid for `ttl_secs` from `now_unix`,
/// cross-signed by `previous` (the active root it replaces) if any.
pub fn generate_root(
    trust_domain: &str,
    ttl_secs: u64,
    now_unix: i64,
    previous: Option<&CaRoot>,
) -> Result<CaRoot, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(format!("cannot generate a key: {e}")))?;
    let (serial, serial_hex) = random_serial::<8>();
    let not_before = now_unix - BACKDATE_SECS;
    let not_after = now_unix.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX / 2));
    let id_bytes = CertificateParams::default().key_identifier(&key);
    let id = colon_hex(&id_bytes);
    // Distinct names per root: a chain is built by names first.
    let name = format!(
        "Meshwork CA Root {}",
        id.replace(':', "").get(..16).unwrap_or("0")
    );
    let params = root_params(trust_domain, &name, serial.clone(), not_before, not_after)?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(format!("cannot make the root: {e}")))?;
    let mut intermediates = Vec::new();
    if let Some(previous) = previous {
        // The same subject and key, issued by the old root.
        let old = issuer(previous)?;
        let cross_params = root_params(trust_domain, &name, serial, not_before, not_after)?;
        let cross = cross_params
            .signed_by(&key, &old)
            .map_err(|e| CaError::Sign(format!("cannot cross-sign the new root: {e}")))?;
        intermediates.push(cross.pem());
    }
    Ok(CaRoot {
        id,
        name,
        serial: serial_hex,
        root_cert_pem: cert.pem(),
        intermediate_cert_pems: intermediates,
        cross_signed_by: previous.map(|p| p.id.clone()),
        max_leaf_ttl_secs: 0,
        private_key_pem: key.serialize_pem(),
        not_before_unix: not_before,
        not_after_unix: not_after,
        active: true,
        rotated_out_unix: None,
        create_index: 0,
        modify_index: 0,
    })
}

/// Takes an operator's root (`PUT /v1/connect/ca/configuration` with
/// `RootCert` and `PrivateKey`): a CA certificate, currently valid, whose
/// key is the one given. [`cross_sign_imported`] then has the current
/// root vouch for it.
pub fn import_root(cert_pem: &str, key_pem: &str, now_unix: i64) -> Result<CaRoot, CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    // Exactly one PEM block each: the parsers here (x509-parser, rcgen's
    // pem) must not be able to read different certificates or keys.
    if cert_pem.matches("-----BEGIN").count() != 1 {
        return Err(CaError::Root(
            "RootCert must be exactly one PEM certificate".into(),
        ));
    }
    if key_pem.matches("-----BEGIN").count() != 1 {
        return Err(CaError::Root(
            "PrivateKey must be exactly one PEM key".into(),
        ));
    }
    let key = KeyPair::from_pem(key_pem)
        .map_err(|_| CaError::Root("PrivateKey is not a PEM PKCS#8 or SEC1 key".into()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|_| CaError::Root("RootCert is not a PEM certificate".into()))?;
    let (_, cert) = X509Certificate::from_der(&pem.contents)
        .map_err(|e| CaError::Root(format!("RootCert cannot be parsed: {e}")))?;
    if !cert.is_ca() {
        return Err(CaError::Root(
            "RootCert is not a CA certificate (basicConstraints CA:TRUE)".into(),
        ));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(CaError::Root(
            "PrivateKey does not match RootCert's public key".into(),
        ));
    }
    // A relative name must hold exactly one attribute to be used as an
    // issuer name here (and an empty one is malformed).
    if cert.subject().iter().any(|rdn| rdn.iter().count() != 1) {
        return Err(CaError::Root(
            "RootCert's subject has an empty or multi-valued name component, which is not supported"
                .into(),
        ));
    }
    let validity = cert.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now_unix < not_before || now_unix >= not_after {
        return Err(CaError::Root("RootCert is not valid now".into()));
    }
    // Leaves must verify: the issuer must be usable by the sidecars'
    // verifier, so check that rcgen can sign with it.
    // Leaves name their issuer as rcgen writes the root's subject: it must
    // be the subject's exact bytes, or no leaf would chain to the root.
    let issuer_check = Issuer::from_ca_cert_pem(cert_pem, key)
        .map_err(|e| CaError::Root(format!("RootCert cannot sign: {e}")))?;
    let key = KeyPair::from_pem(key_pem)
        .map_err(|_| CaError::Root("PrivateKey is not a PEM key".into()))?;
    let probe = CertificateParams::default()
        .signed_by(&key, &issuer_check)
        .map_err(|e| CaError::Root(format!("RootCert cannot sign: {e}")))?;
    let (_, probe) = X509Certificate::from_der(probe.der())
        .map_err(|e| CaError::Root(format!("RootCert cannot sign: {e}")))?;
    if probe.issuer().as_raw() != cert.subject().as_raw() {
        return Err(CaError::Root(
            "RootCert's subject cannot be written back exactly as an issuer name (a repeated attribute type?), so its leaves would not chain to it".into(),
        ));
    }
    let id = colon_hex(&CertificateParams::default().key_identifier(&key));
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("Meshwork CA Root (imported)")
        .to_owned();
    Ok(CaRoot {
        id,
        name,
        serial: colon_hex(cert.raw_serial()),
        root_cert_pem: cert_pem.trim().to_owned() + "\n",
        intermediate_cert_pems: Vec::new(),
        cross_signed_by: None,
        max_leaf_ttl_secs: 0,
        private_key_pem: key.serialize_pem(),
        not_before_unix: not_before,
        not_after_unix: not_after,
        active: true,
        rotated_out_unix: None,
        create_index: 0,
        modify_index: 0,
    })
}

/// `root`'s subject as rcgen writes names, if it can be written back as
/// it is: one attribute per relative name, no attribute type twice, and
/// string types rcgen keeps.
fn rebuilt_subject(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Option<DistinguishedName> {
    use rcgen::DnValue;
    use x509_parser::der_parser::asn1_rs::Tag;
    let mut dn = DistinguishedName::new();
    let mut seen = Vec::new();
    for rdn in cert.subject().iter() {
        let mut attributes = rdn.iter();
        let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
            return None;
        };
        let oid: Vec<u64> = attribute.attr_type().iter()?.collect();
        if seen.contains(&oid) {
            return None;
        }
        let value = attribute.attr_value();
        let text = std::str::from_utf8(value.data).ok()?;
        let value = match value.header.tag() {
            Tag::PrintableString => DnValue::PrintableString(text.try_into().ok()?),
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::Ia5String => DnValue::Ia5String(text.try_into().ok()?),
            _ => return None,
        };
        dn.push(DnType::from_oid(&oid), value);
        seen.push(oid);
    }
    Some(dn)
}

/// Has `previous` (the active root being replaced) cross-sign an
/// operator's root, as rotation to a generated root does: a certificate
/// with the operator root's subject, key and key id, issued by the old
/// root, which leaves of the new root carry in their chain so that peers
/// that know only the old root accept them. `Err` says why it cannot be
/// made (a subject that cannot be written back byte for byte); the caller
/// then needs `ForceWithoutCrossSigning`.
pub fn cross_sign_imported(root: &mut CaRoot, previous: &CaRoot) -> Result<(), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, pem) = x509_parser::pem::parse_x509_pem(root.root_cert_pem.as_bytes())
        .map_err(|_| "RootCert is not a PEM certificate".to_owned())?;
    let (_, cert) =
        X509Certificate::from_der(&pem.contents).map_err(|e| format!("RootCert: {e}"))?;
    let subject = rebuilt_subject(&cert).ok_or_else(|| {
        "its subject cannot be written back exactly (a multi-valued or repeated attribute,          or a string type other than PrintableString, UTF8String or IA5String)"
            .to_owned()
    })?;
    // What the copy would not carry: a peer trusting only the old root
    // would then accept more than the operator's root allows.
    use x509_parser::extensions::ParsedExtension as X;
    for ext in cert.iter_extensions() {
        match ext.parsed_extension() {
            X::BasicConstraints(_)
            | X::KeyUsage(_)
            | X::SubjectKeyIdentifier(_)
            | X::AuthorityKeyIdentifier(_)
            | X::SubjectAlternativeName(_) => {}
            other => {
                return Err(format!(
                    "it has an extension the cross-signed copy would not carry ({}), \
                     which would let peers that know only the old root accept more than it allows",
                    extension_name(other, ext.oid.to_id_string())
                ));
            }
        }
    }
    let key = KeyPair::from_pem(&root.private_key_pem)
        .map_err(|_| "its private key cannot be read".to_owned())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    let (serial, _) = random_serial::<8>();
    params.serial_number = Some(serial);
    params.is_ca = match cert.basic_constraints().ok().flatten() {
        Some(bc) => match bc.value.path_len_constraint {
            Some(n) => IsCa::Ca(BasicConstraints::Constrained(
                u8::try_from(n).unwrap_or(u8::MAX),
            )),
            None => IsCa::Ca(BasicConstraints::Unconstrained),
        },
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    // The operator's key usages, no more (a CA without the extension may
    // sign certificates and CRLs).
    params.key_usages = match cert.key_usage().ok().flatten() {
        Some(ku) => {
            let ku = ku.value;
            [
                (ku.key_cert_sign(), KeyUsagePurpose::KeyCertSign),
                (ku.crl_sign(), KeyUsagePurpose::CrlSign),
                (ku.digital_signature(), KeyUsagePurpose::DigitalSignature),
            ]
            .into_iter()
            .filter_map(|(set, usage)| set.then_some(usage))
            .collect()
        }
        None => vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
    };
    if !params.key_usages.contains(&KeyUsagePurpose::KeyCertSign) {
        return Err("its key usage does not allow signing certificates".into());
    }
    // The operator's key id, which the leaves' authority key id names.
    if let Some(ski) = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        })
    {
        params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(ski);
    }
    params.use_authority_key_identifier_extension = true;
    params.not_before = at(root.not_before_unix).map_err(|e| e.to_string())?;
    params.not_after = at(root.not_after_unix).map_err(|e| e.to_string())?;
    let cross = params
        .signed_by(&key, &issuer(previous).map_err(|e| e.to_string())?)
        .map_err(|e| format!("cannot cross-sign: {e}"))?;
    // Chains are built by names: the copy must name exactly the root.
    let (_, made) = X509Certificate::from_der(cross.der())
        .map_err(|e| format!("the cross-signed certificate does not parse: {e}"))?;
    if made.subject().as_raw() != cert.subject().as_raw() {
        return Err("its subject cannot be written back byte for byte".into());
    }
    root.intermediate_cert_pems = vec![cross.pem()];
    root.cross_signed_by = Some(previous.id.clone());
    Ok(())
}

fn extension_name(ext: &x509_parser::extensions::ParsedExtension<'_>, oid: String) -> String {
    use x509_parser::extensions::ParsedExtension as X;
    match ext {
        X::NameConstraints(_) => "name constraints".into(),
        X::PolicyConstraints(_) => "policy constraints".into(),
        X::ExtendedKeyUsage(_) => "extended key usage".into(),
        X::CertificatePolicies(_) => "certificate policies".into(),
        X::InhibitAnyPolicy(_) => "inhibit any policy".into(),
        X::PolicyMappings(_) => "policy mappings".into(),
        _ => format!("OID {oid}"),
    }
}

/// Whether `service` can be the last segment of a SPIFFE ID: letters,
/// digits, `-`, `_` and `.` (what Consul's service names use), at most
/// 255 characters.
pub fn valid_service_name(service: &str) -> Result<(), String> {
    if service.is_empty() || service.len() > 255 {
        return Err("a service name of 1 to 255 characters".into());
    }
    match service
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(c) => Err(format!(
            "service name {service:?}: {c:?} cannot be in a SPIFFE ID (use letters, digits, '-', '_', '.')"
        )),
        None if service == "." || service == ".." => {
            Err(format!("service name {service:?} is not a name"))
        }
        None => Ok(()),
    }
}

/// The seconds since the Unix epoch now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Signs a leaf for `service` with the CA of `state` (this server's
/// replica): from `csr_pem`, or with a key made here when `None`.
pub fn leaf_from_state(
    state: &crate::state::State,
    datacenter: &str,
    service: &str,
    csr_pem: Option<&str>,
) -> Result<Leaf, CaError> {
    valid_service_name(service).map_err(CaError::Csr)?;
    let cluster_id = state.cluster_id.as_deref().ok_or(CaError::NotReady)?;
    let td = trust_domain(cluster_id);
    let to = LeafFor {
        trust_domain: &td,
        datacenter,
        service,
        now_unix: now_unix(),
    };
    match csr_pem {
        Some(csr) => sign_csr(&state.ca, csr, to),
        None => issue_leaf(&state.ca, to),
    }
}

/// A signed leaf.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Leaf {
    /// The leaf alone.
    pub cert_pem: String,
    /// The leaf, then the cross-signed root if the active root has one.
    pub chain_pem: String,
    pub serial: String,
    pub spiffe_id: String,
    pub service: String,
    pub valid_after_unix: i64,
    pub valid_before_unix: i64,
    pub root_id: String,
    /// Only for leaves whose key the server made
    /// (`/v1/agent/connect/ca/leaf/:service`); never serialized (a leaf
    /// forwarded between servers carries none).
    #[serde(skip)]
    pub private_key_pem: Option<String>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("serial", &self.serial)
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

/// What a leaf is for.
#[derive(Debug, Clone, Copy)]
pub struct LeafFor<'a> {
    pub trust_domain: &'a str,
    pub datacenter: &'a str,
    pub service: &'a str,
    pub now_unix: i64,
}

fn leaf_params(
    ca: &CaStore,
    root: &CaRoot,
    to: LeafFor<'_>,
) -> Result<(CertificateParams, String, String), CaError> {
    let spiffe = spiffe_id(to.trust_domain, to.datacenter, to.service);
    let mut params = CertificateParams::default();
    let (serial, serial_hex) = random_serial::<16>();
    params.serial_number = Some(serial);
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, to.service);
    params.distinguished_name = subject;
    params.subject_alt_names = vec![SanType::URI(
        spiffe
            .clone()
            .try_into()
            .map_err(|e| CaError::Csr(format!("service name: {e}")))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    // An ECDSA key's usages; `sign_csr` sets an RSA or Ed25519 key's.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let ttl = i64::try_from(ca.config.leaf_cert_ttl_secs).unwrap_or(i64::MAX / 2);
    params.not_before = at(to.now_unix - BACKDATE_SECS)?;
    // Never past the root's own end.
    params.not_after = at(to.now_unix.saturating_add(ttl).min(root.not_after_unix))?;
    Ok((params, spiffe, serial_hex))
}

fn finish(
    root: &CaRoot,
    to: LeafFor<'_>,
    params: &CertificateParams,
    cert_pem: String,
    spiffe: String,
    serial: String,
    key: Option<String>,
) -> Leaf {
    let mut chain_pem = cert_pem.clone();
    for intermediate in &root.intermediate_cert_pems {
        chain_pem.push_str(intermediate);
    }
    Leaf {
        cert_pem,
        chain_pem,
        serial,
        spiffe_id: spiffe,
        service: to.service.to_owned(),
        valid_after_unix: params.not_before.unix_timestamp(),
        valid_before_unix: params.not_after.unix_timestamp(),
        root_id: root.id.clone(),
        private_key_pem: key,
    }
}

/// Signs a leaf for `to.service` with the active root from a CSR (PEM):
/// only the CSR's public key is used (its signature is checked); the
/// names, usages and lifetime are the CA's.
pub fn sign_csr(ca: &CaStore, csr_pem: &str, to: LeafFor<'_>) -> Result<Leaf, CaError> {
    let root = ca.active().ok_or(CaError::NotReady)?;
    if csr_pem.len() > 16 * 1024 {
        return Err(CaError::Csr("larger than 16 KiB".into()));
    }
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::Csr(e.to_string()))?;
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256
        && !matches!(
            csr.public_key.algorithm(),
            a if *a == rcgen::PKCS_ECDSA_P384_SHA384
                || *a == rcgen::PKCS_ED25519
                || *a == rcgen::PKCS_RSA_SHA256
        )
    {
        return Err(CaError::Csr("unsupported key algorithm".into()));
    }
    let (mut params, spiffe, serial) = leaf_params(ca, root, to)?;
    let algorithm = csr.public_key.algorithm();
    if *algorithm == rcgen::PKCS_RSA_SHA256 {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
    } else if *algorithm == rcgen::PKCS_ED25519 {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    csr.params = params;
    let cert = csr
        .signed_by(&issuer(root)?)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(finish(
        root,
        to,
        &csr.params,
        cert.pem(),
        spiffe,
        serial,
        None,
    ))
}

/// Makes a key and a leaf for `to.service` (Consul's agent leaf endpoint,
/// for clients that do not make their own key).
pub fn issue_leaf(ca: &CaStore, to: LeafFor<'_>) -> Result<Leaf, CaError> {
    let root = ca.active().ok_or(CaError::NotReady)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(format!("cannot generate a key: {e}")))?;
    let (params, spiffe, serial) = leaf_params(ca, root, to)?;
    let cert = params
        .signed_by(&key, &issuer(root)?)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(finish(
        root,
        to,
        &params,
        cert.pem(),
        spiffe,
        serial,
        Some(key.serialize_pem()),
    ))
}

pub mod sign;

#[cfg(test)]
mod tests;
