use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;

use super::*;
use crate::state::ca::CaStore;

const NOW: i64 = 1_800_000_000;

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

/// Whether `chain` (leaf first) verifies as a client certificate against
/// `roots` at `now`.
fn verifies(chain: &str, roots: &[&CaRoot], now: i64) -> bool {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(certs(&root.root_cert_pem).remove(0))
            .expect("root");
    }
    #[allow(deprecated)] // ring, as the servers use
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .expect("verifier");
    let chain = certs(chain);
    verifier
        .verify_client_cert(
            &chain[0],
            &chain[1..],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from(now).expect("positive"),
            )),
        )
        .is_ok()
}

fn store_with(root: CaRoot, ttl: u64) -> CaStore {
    let mut ca = CaStore::default();
    ca.config.leaf_cert_ttl_secs = ttl;
    assert!(ca.rotate(1, None, &root, None, NOW));
    ca
}

fn to(service: &str) -> LeafFor<'_> {
    LeafFor {
        trust_domain: "c1.meshwork",
        datacenter: "dc1",
        service,
        now_unix: NOW,
    }
}

fn csr(service: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(vec!["evil.example.com".to_owned()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{service}-but-evil"));
    let csr = params.serialize_request(&key).expect("csr");
    (key, csr.pem().expect("pem"))
}

#[test]
fn a_leaf_from_a_csr_has_only_the_spiffe_id_and_verifies() {
    let root = generate_root("c1.meshwork", 3600 * 24, NOW, None).expect("root");
    let ca = store_with(root.clone(), 3600);
    let (_, csr_pem) = csr("web");
    let leaf = sign_csr(&ca, &csr_pem, to("web")).expect("signed");
    assert_eq!(
        leaf.spiffe_id,
        "spiffe://c1.meshwork/ns/default/dc/dc1/svc/web"
    );
    assert_eq!(leaf.valid_before_unix, NOW + 3600);
    assert_eq!(leaf.root_id, root.id);
    assert!(verifies(&leaf.chain_pem, &[&root], NOW + 10));
    assert!(!verifies(&leaf.chain_pem, &[&root], NOW + 3601), "expired");
    // What the CSR asked for (a DNS name, CA:TRUE) is not in the leaf.
    let der = certs(&leaf.cert_pem).remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("x509");
    assert!(!parsed.is_ca());
    let sans = parsed
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("has a SAN")
        .value
        .general_names
        .iter()
        .map(|n| format!("{n}"))
        .collect::<Vec<_>>();
    assert_eq!(sans.len(), 1, "{sans:?}");
    assert!(sans[0].contains("spiffe://c1.meshwork/ns/default/dc/dc1/svc/web"));
    // Another CA's root does not accept it.
    let other = generate_root("c2.meshwork", 3600 * 24, NOW, None).expect("root");
    assert!(!verifies(&leaf.chain_pem, &[&other], NOW + 10));
}

#[test]
fn a_rotated_roots_leaves_verify_against_the_old_root_through_the_cross_signature() {
    let old = generate_root("c1.meshwork", 3600 * 24, NOW, None).expect("root");
    let mut ca = store_with(old.clone(), 3600);
    let new = generate_root("c1.meshwork", 3600 * 24, NOW, Some(&old)).expect("new root");
    assert_eq!(new.intermediate_cert_pems.len(), 1);
    assert!(ca.rotate(2, Some(&old.id), &new, None, NOW));
    let leaf = issue_leaf(&ca, to("api")).expect("leaf");
    assert_eq!(leaf.root_id, new.id);
    assert!(leaf.private_key_pem.is_some());
    // A peer that only knows the old root, one that only knows the new.
    assert!(verifies(&leaf.chain_pem, &[&old], NOW + 10));
    assert!(verifies(&leaf.chain_pem, &[&new], NOW + 10));
    assert!(verifies(&leaf.cert_pem, &[&new], NOW + 10));
    assert!(!verifies(&leaf.cert_pem, &[&old], NOW + 10));
}

#[test]
fn bad_csrs_and_roots_are_refused_with_a_reason() {
    let root = generate_root("c1.meshwork", 3600, NOW, None).expect("root");
    let ca = store_with(root.clone(), 3600);
    for junk in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let e = sign_csr(&ca, junk, to("web")).expect_err("junk");
        assert!(e.to_string().starts_with("invalid CSR"), "{e}");
    }
    assert!(matches!(
        sign_csr(&CaStore::default(), "x", to("web")),
        Err(CaError::NotReady)
    ));
    // Import: matching key and CA certificate only.
    let imported = import_root(&root.root_cert_pem, &root.private_key_pem, NOW).expect("import");
    assert_eq!(imported.id, root.id);
    let other = generate_root("c1.meshwork", 3600, NOW, None).expect("root");
    let e = import_root(&root.root_cert_pem, &other.private_key_pem, NOW).expect_err("mismatch");
    assert!(e.to_string().contains("does not match"), "{e}");
    let leaf = issue_leaf(&ca, to("web")).expect("leaf");
    let e = import_root(
        &leaf.cert_pem,
        leaf.private_key_pem.as_deref().expect("key"),
        NOW,
    )
    .expect_err("not a CA");
    assert!(e.to_string().contains("not a CA"), "{e}");
    let e =
        import_root(&root.root_cert_pem, &root.private_key_pem, NOW + 7200).expect_err("expired");
    assert!(e.to_string().contains("not valid now"), "{e}");
}

/// An operator's CA certificate with `subject`, its own key and a key id
/// of its own (as OpenSSL makes: not rcgen's method).
fn operator_root(subject: DistinguishedName) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(vec![7; 20]);
    params.not_before = at(NOW - 10).expect("time");
    params.not_after = at(NOW + 3600 * 24).expect("time");
    let cert = params.self_signed(&key).expect("operator root");
    (cert.pem(), key.serialize_pem())
}

#[test]
fn an_operators_root_is_cross_signed_so_peers_with_the_old_root_accept_its_leaves() {
    use rcgen::DnValue;
    let old = generate_root("c1.meshwork", 3600 * 24, NOW, None).expect("root");
    let mut ca = store_with(old.clone(), 3600);
    let mut subject = DistinguishedName::new();
    subject.push(
        DnType::CountryName,
        DnValue::PrintableString("DE".try_into().expect("printable")),
    );
    subject.push(DnType::OrganizationName, "Example Corp");
    subject.push(DnType::CommonName, "Example Mesh Root");
    let (cert, key) = operator_root(subject);
    let mut new = import_root(&cert, &key, NOW).expect("import");
    assert!(new.intermediate_cert_pems.is_empty());
    cross_sign_imported(&mut new, &old).expect("cross-signed");
    assert_eq!(new.cross_signed_by.as_deref(), Some(old.id.as_str()));
    assert!(ca.rotate(2, Some(&old.id), &new, None, NOW));
    let leaf = issue_leaf(&ca, to("api")).expect("leaf");
    assert_eq!(leaf.root_id, new.id);
    // A peer that knows only the old root, and one that knows the new.
    assert!(verifies(&leaf.chain_pem, &[&old], NOW + 10));
    assert!(verifies(&leaf.chain_pem, &[&new], NOW + 10));
    assert!(!verifies(&leaf.cert_pem, &[&old], NOW + 10));
    // The copy keeps the operator's key id and names the old root as its
    // authority.
    let der = certs(&new.intermediate_cert_pems[0]).remove(0);
    let (_, cross) = x509_parser::parse_x509_certificate(&der).expect("x509");
    let ski = cross
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        });
    assert_eq!(ski, Some(vec![7; 20]));
    assert!(cross.is_ca());
}

#[test]
fn a_subject_that_cannot_be_copied_exactly_is_not_cross_signed() {
    let old = generate_root("c1.meshwork", 3600 * 24, NOW, None).expect("root");
    // A BMPString: leaves can name it (rcgen writes it back as it is), a
    // cross-signed copy here is not made.
    let mut subject = DistinguishedName::new();
    subject.push(
        DnType::CommonName,
        rcgen::DnValue::BmpString("Root".try_into().expect("bmp")),
    );
    let (cert, key) = operator_root(subject);
    let mut new = import_root(&cert, &key, NOW).expect("import");
    let why = cross_sign_imported(&mut new, &old).expect_err("not copied");
    assert!(why.contains("written back"), "{why}");
    assert!(new.intermediate_cert_pems.is_empty() && new.cross_signed_by.is_none());
}

#[test]
fn a_root_whose_limits_a_copy_would_lose_is_not_cross_signed_and_odd_pem_is_refused() {
    let old = generate_root("c1.meshwork", 3600 * 24, NOW, None).expect("root");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Constrained Root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.com".into())],
        excluded_subtrees: Vec::new(),
    });
    params.not_before = at(NOW - 10).expect("time");
    params.not_after = at(NOW + 3600).expect("time");
    let cert = params.self_signed(&key).expect("root");
    let mut new = import_root(&cert.pem(), &key.serialize_pem(), NOW).expect("import");
    let why = cross_sign_imported(&mut new, &old).expect_err("not copied");
    assert!(why.contains("name constraints"), "{why}");
    // Two PEM blocks, where two parsers could read different ones.
    let two = format!("{}{}", old.root_cert_pem, cert.pem());
    let e = import_root(&two, &key.serialize_pem(), NOW).expect_err("two certificates");
    assert!(e.to_string().contains("exactly one"), "{e}");
    let hidden = format!("x{}", cert.pem());
    let e = import_root(&hidden, &key.serialize_pem(), NOW).expect_err("hidden block");
    assert!(e.to_string().contains("PEM"), "{e}");
}
