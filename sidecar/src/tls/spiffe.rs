//! SPIFFE identities as the mesh writes them,
//! `spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>`, and reading
//! one from a certificate's URI SAN. Pure functions: what to do with an
//! identity (trust it, refuse it) is [`super::trust`]'s.

use rustls_pki_types::CertificateDer;

/// A service's identity in the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub dc: String,
    pub service: String,
}

/// Why a certificate or a URI is not a mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed")]
    BadCertificate,
    #[error("the certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("the certificate has more than one spiffe:// URI SAN")]
    SeveralSpiffeIds,
    #[error("{0:?} is not spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>")]
    Malformed(String),
    #[error("trust domain {found:?} is not the mesh's ({expected:?})")]
    ForeignTrustDomain { found: String, expected: String },
    #[error("service {found:?} is not the expected {expected:?}")]
    WrongService { found: String, expected: String },
}

impl SpiffeId {
    /// Parses a service identity strictly: the scheme, a trust domain,
    /// then exactly `ns/default/dc/<dc>/svc/<service>`, no query, fragment,
    /// port, user or empty segment.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Malformed(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        if rest.contains(['?', '#', '@', ':', '%']) || rest.chars().any(char::is_whitespace) {
            return Err(bad());
        }
        let mut parts = rest.split('/');
        let trust_domain = parts.next().ok_or_else(bad)?;
        let segments: Vec<&str> = parts.collect();
        let [ns_key, ns, dc_key, dc, svc_key, service] = segments[..] else {
            return Err(bad());
        };
        if trust_domain.is_empty()
            || ns_key != "ns"
            || ns != "default"
            || dc_key != "dc"
            || dc.is_empty()
            || svc_key != "svc"
            || service.is_empty()
        {
            return Err(bad());
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            dc: dc.to_owned(),
            service: service.to_owned(),
        })
    }

    /// Its URI form.
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{}/svc/{}",
            self.trust_domain, self.dc, self.service
        )
    }

    /// Fails unless the identity is in `trust_domain` (case-insensitive,
    /// as trust domains are) and, when given, names `service`.
    pub fn check(&self, trust_domain: &str, service: Option<&str>) -> Result<(), IdentityError> {
        if !self.trust_domain.eq_ignore_ascii_case(trust_domain) {
            return Err(IdentityError::ForeignTrustDomain {
                found: self.trust_domain.clone(),
                expected: trust_domain.to_owned(),
            });
        }
        match service {
            Some(expected) if expected != self.service => Err(IdentityError::WrongService {
                found: self.service.clone(),
                expected: expected.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

/// The one `spiffe://` URI SAN of a certificate, parsed. Other URI SANs
/// are ignored; two SPIFFE IDs make the certificate ambiguous and refused.
pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| IdentityError::BadCertificate)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| IdentityError::BadCertificate)?
        .ok_or(IdentityError::NoSpiffeId)?;
    let mut found = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && uri
                .get(..9)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
        {
            if found.is_some() {
                return Err(IdentityError::SeveralSpiffeIds);
            }
            found = Some(*uri);
        }
    }
    SpiffeId::parse(found.ok_or(IdentityError::NoSpiffeId)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_identities_parse_strictly() {
        let id =
            SpiffeId::parse("spiffe://c0ffee.meshwork/ns/default/dc/dc1/svc/web").expect("valid");
        assert_eq!(id.trust_domain, "c0ffee.meshwork");
        assert_eq!(id.dc, "dc1");
        assert_eq!(id.service, "web");
        assert_eq!(
            id.uri(),
            "spiffe://c0ffee.meshwork/ns/default/dc/dc1/svc/web"
        );
        for bad in [
            "",
            "https://c0ffee.meshwork/ns/default/dc/dc1/svc/web",
            "spiffe://",
            "spiffe:///ns/default/dc/dc1/svc/web",
            "spiffe://td/ns/default/dc/dc1/svc/",
            "spiffe://td/ns/default/dc//svc/web",
            "spiffe://td/ns/other/dc/dc1/svc/web",
            "spiffe://td/ns/default/dc/dc1/svc/web/extra",
            "spiffe://td/ns/default/dc/dc1/svc/web/",
            "spiffe://td/ns/default/dc/dc1/agent/web",
            "spiffe://td/ns/default/dc/dc1/svc/web?x=1",
            "spiffe://td/ns/default/dc/dc1/svc/web#f",
            "spiffe://td:443/ns/default/dc/dc1/svc/web",
            "spiffe://u@td/ns/default/dc/dc1/svc/web",
            "spiffe://td/ns/default/dc/dc1/svc/w%2Fb",
            "spiffe://td/ns/default/dc/dc1/svc/w b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn checks_compare_trust_domain_and_service() {
        let id = SpiffeId::parse("spiffe://TD.meshwork/ns/default/dc/dc2/svc/api").expect("valid");
        assert_eq!(id.check("td.meshwork", Some("api")), Ok(()));
        assert_eq!(id.check("td.meshwork", None), Ok(()));
        assert!(matches!(
            id.check("other.meshwork", Some("api")),
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(
            id.check("td.meshwork", Some("web")),
            Err(IdentityError::WrongService { .. })
        ));
    }

    fn cert_with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().expect("ia5")))
            .collect();
        params.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn the_identity_is_read_from_the_uri_san() {
        let cert = cert_with_uris(&[
            "https://example.com/x",
            "spiffe://td.meshwork/ns/default/dc/dc1/svc/web",
        ]);
        assert_eq!(of_certificate(&cert).expect("identity").service, "web");
        assert_eq!(
            of_certificate(&cert_with_uris(&[])),
            Err(IdentityError::NoSpiffeId)
        );
        assert_eq!(
            of_certificate(&cert_with_uris(&[
                "spiffe://td.meshwork/ns/default/dc/dc1/svc/web",
                "spiffe://td.meshwork/ns/default/dc/dc1/svc/admin",
            ])),
            Err(IdentityError::SeveralSpiffeIds)
        );
        assert_eq!(
            of_certificate(&CertificateDer::from(vec![1, 2, 3])),
            Err(IdentityError::BadCertificate)
        );
    }
}
