//! TLS for the registry (rustls, ring provider): the CA, certificate and
//! key from `tls.ca_file`, `tls.cert_file`, `tls.key_file`, and the rustls
//! configurations built on them —
//!
//! - between servers (Raft and internal gRPC): mutual TLS, both sides
//!   presenting a certificate the CA signed; with `verify_server_hostname`
//!   each must also name `server.<datacenter>.meshwork`, so a client
//!   certificate from the same CA cannot pass for a server;
//! - HTTPS and gRPC over TLS for clients: the server's certificate, and a
//!   client certificate asked for, required only with `verify_incoming`.
//!
//! The files are read again on SIGHUP ([`Tls::reload`]): new handshakes use
//! the new material, open connections keep theirs. A reload that fails
//! (missing file, key not matching, not signed by the CA) changes nothing
//! and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

pub mod io;

/// The TLS settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// HTTPS and gRPC-over-TLS clients must present a certificate the CA
    /// signed (between servers it is always required).
    pub verify_incoming: bool,
    /// Servers must prove they are servers: `server.<dc>.meshwork` in
    /// their certificate's names.
    pub verify_server_hostname: bool,
    /// `server.<datacenter>.meshwork`.
    pub server_name: String,
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

/// What the files held, checked against each other.
#[derive(Debug)]
struct Material {
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    /// Verifies peers against `roots` (built once per load).
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<rustls::client::WebPkiServerVerifier>,
}

/// The registry's TLS identity and trust, reloadable.
#[derive(Debug)]
pub struct Tls {
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    material: RwLock<Arc<Material>>,
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("cannot read the {what} {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{} is not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} holds no certificate (expected PEM \"BEGIN CERTIFICATE\")",
            path.display()
        )));
    }
    Ok(certs)
}

impl Tls {
    /// Reads and checks the files.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        // ring rather than aws-lc-rs: no C/CMake build in the tree. (Its
        // only loss is the post-quantum key exchange, hence the lint.)
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let material = Self::read(&settings, &provider)?;
        Ok(Self {
            settings,
            provider,
            material: RwLock::new(Arc::new(material)),
        })
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    fn read(settings: &TlsSettings, provider: &Arc<CryptoProvider>) -> Result<Material, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&settings.ca_file, "CA file")? {
            roots.add(cert).map_err(|e| {
                TlsError(format!(
                    "{}: not a usable CA certificate: {e}",
                    settings.ca_file.display()
                ))
            })?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(&settings.cert_file, "certificate file")?;
        let key = PrivateKeyDer::from_pem_file(&settings.key_file).map_err(|e| {
            TlsError(format!(
                "cannot read a private key from {}: {e}",
                settings.key_file.display()
            ))
        })?;
        let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            TlsError(format!(
                "{} and {} do not go together: {e}",
                settings.cert_file.display(),
                settings.key_file.display()
            ))
        })?;
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(provider),
        )
        .build()
        .map_err(|e| TlsError(format!("CA: {e}")))?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
                .build()
                .map_err(|e| TlsError(format!("CA: {e}")))?;
        // Our own certificate must chain to the CA we ask others for: a
        // server that would refuse itself is a configuration mistake.
        let leaf = certified
            .cert
            .first()
            .ok_or_else(|| TlsError("empty certificate chain".into()))?;
        client_verifier
            .verify_client_cert(leaf, &certified.cert[1..], UnixTime::now())
            .map_err(|e| {
                TlsError(format!(
                    "{} is not a valid certificate from the CA in {}: {e}",
                    settings.cert_file.display(),
                    settings.ca_file.display()
                ))
            })?;
        if settings.verify_server_hostname {
            has_name(leaf, &settings.server_name).map_err(|e| {
                TlsError(format!(
                    "{} does not name {:?} (verify_server_hostname is on): {e}",
                    settings.cert_file.display(),
                    settings.server_name
                ))
            })?;
        }
        Ok(Material {
            roots,
            certified: Arc::new(certified),
            client_verifier,
            server_verifier,
        })
    }

    /// Reads the files again (SIGHUP); on failure the old material stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let material = Self::read(&self.settings, &self.provider)?;
        *self.material.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        Ok(())
    }

    fn current(&self) -> Arc<Material> {
        Arc::clone(&self.material.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The server side of a listener speaking `alpn` (`h2` for gRPC,
    /// `http/1.1` for the REST API). `peers_are_servers`: the internal
    /// port, where the client must be another server; otherwise a client
    /// certificate is required only with `verify_incoming`.
    pub fn server_config(
        self: &Arc<Self>,
        peers_are_servers: bool,
        alpn: &[u8],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = Arc::new(PeerVerifier {
            tls: Arc::clone(self),
            mandatory: peers_are_servers || self.settings.verify_incoming,
            must_be_server: peers_are_servers && self.settings.verify_server_hostname,
        });
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(OwnCert(Arc::clone(self))));
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side of a connection to another server: our certificate,
    /// and theirs checked against the CA (and its name with
    /// `verify_server_hostname`).
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier(Arc::clone(self))))
            .with_client_cert_resolver(Arc::new(OwnCert(Arc::clone(self))));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The name a server is dialled by (and checked against).
    pub fn server_name(&self) -> Result<ServerName<'static>, TlsError> {
        ServerName::try_from(self.settings.server_name.clone())
            .map_err(|e| TlsError(format!("{:?}: {e}", self.settings.server_name)))
    }

    /// The CA's certificates (for tests and diagnostics).
    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.current().roots)
    }
}

fn has_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), Error> {
    let server_name = ServerName::try_from(name)
        .map_err(|_| Error::General(format!("{name:?} is not a DNS name")))?;
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    })?;
    parsed
        .verify_is_valid_for_subject_name(&server_name)
        .map_err(|_| Error::InvalidCertificate(CertificateError::NotValidForName))
}

/// Presents our certificate, as server and as client.
#[derive(Debug)]
struct OwnCert(Arc<Tls>);

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().certified))
    }
}

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().certified))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks a client's certificate against the current CA.
#[derive(Debug)]
struct PeerVerifier {
    tls: Arc<Tls>,
    mandatory: bool,
    must_be_server: bool,
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Any certificate the CA signed; no hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let material = self.tls.current();
        let verified =
            material
                .client_verifier
                .verify_client_cert(end_entity, intermediates, now)?;
        if self.must_be_server {
            has_name(end_entity, &self.tls.settings.server_name)?;
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.tls
            .current()
            .client_verifier
            .supported_verify_schemes()
    }
}

/// Checks another server's certificate against the current CA; its name
/// only with `verify_server_hostname` (Consul's rule).
#[derive(Debug)]
struct ServerVerifier(Arc<Tls>);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verifier = Arc::clone(&self.0.current().server_verifier);
        match verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.0.settings.verify_server_hostname => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().server_verifier.supported_verify_schemes()
    }
}
