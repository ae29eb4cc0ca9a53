//! Where the registry is and how to speak to it: plain HTTP, or HTTPS as
//! Consul's CLI does it.
//!
//! `--http-addr https://HOST:PORT` (or a scheme-less address with
//! `MESHWORK_HTTP_SSL` / `CONSUL_HTTP_SSL` true) selects TLS. The
//! registry's certificate is checked against `--ca-file` and the
//! address's host (or `--tls-server-name`); `--client-cert` and
//! `--client-key` answer a registry with `verify_incoming`.
//!
//! Each setting comes from its flag (even empty, which means none), else
//! the `MESHWORK_` variable, else the `CONSUL_` one; empty variables count
//! as unset. No system roots are bundled: HTTPS without a CA file is
//! refused rather than trusting whatever answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::CtlError;

/// The address used when none is given.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8500";

/// The connection flags as given on the command line.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub http_addr: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub tls_server_name: Option<String>,
}

/// Where the registry is, and whether to speak TLS to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`, without a scheme.
    pub addr: String,
    /// `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// The HTTPS settings: which files to read, which name to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    /// Certificate and key, for a registry with `verify_incoming`.
    pub client: Option<(PathBuf, PathBuf)>,
    /// The name the registry's certificate must carry; default: the
    /// address's host.
    pub server_name: Option<String>,
}

impl Endpoint {
    /// `addr` is `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`;
    /// a scheme-less address is HTTPS when `ssl` says so (it is asked only
    /// then). The TLS settings start empty.
    pub fn parse(
        addr: &str,
        ssl: impl FnOnce() -> Result<bool, CtlError>,
    ) -> Result<Self, CtlError> {
        let trimmed = addr.trim().trim_end_matches('/');
        let invalid = || {
            CtlError::Usage(format!(
                "invalid HTTP address {addr:?}: want HOST:PORT, http://HOST:PORT or https://HOST:PORT, \
                 e.g. 127.0.0.1:8500 or https://127.0.0.1:8501 (--http-addr or MESHWORK_HTTP_ADDR)"
            ))
        };
        let (https, bare) = match trimmed.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            Some(_) => return Err(invalid()),
            None => (ssl()?, trimmed),
        };
        let valid = bare
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            && !bare.contains('/');
        if !valid {
            return Err(invalid());
        }
        Ok(Self {
            addr: bare.to_owned(),
            tls: https.then(TlsFiles::default),
        })
    }

    /// The address's host, without the brackets of an IPv6 address.
    pub fn host(&self) -> &str {
        let host = self.addr.rsplit_once(':').map_or("", |(host, _)| host);
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }
}

/// The endpoint from the flags, then `MESHWORK_*`, then `CONSUL_*`
/// variables (read through `env`).
pub fn resolve(flags: Flags, env: impl Fn(&str) -> Option<String>) -> Result<Endpoint, CtlError> {
    let first = |names: [&str; 2]| names.into_iter().filter_map(&env).find(|v| !v.is_empty());
    // A flag wins even when empty, which means "none" (so that it can
    // override a variable); an empty variable counts as unset.
    let path = |flag: Option<PathBuf>, names: [&str; 2]| match flag {
        Some(path) => (!path.as_os_str().is_empty()).then_some(path),
        None => first(names).map(PathBuf::from),
    };
    let addr = flags
        .http_addr
        .or_else(|| first(["MESHWORK_HTTP_ADDR", "CONSUL_HTTP_ADDR"]))
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    let mut endpoint = Endpoint::parse(&addr, || {
        ["MESHWORK_HTTP_SSL", "CONSUL_HTTP_SSL"]
            .into_iter()
            .find_map(|name| env(name).filter(|v| !v.is_empty()).map(|v| (name, v)))
            .map_or(Ok(false), |(name, value)| {
                parse_bool(&value).ok_or_else(|| {
                    CtlError::Usage(format!("invalid {name} {value:?}: want true or false"))
                })
            })
    })?;
    let Some(tls) = endpoint.tls.as_mut() else {
        // Plain HTTP: the TLS settings are not read (as Consul's CLI).
        return Ok(endpoint);
    };
    tls.ca_file = path(flags.ca_file, ["MESHWORK_CACERT", "CONSUL_CACERT"]);
    let cert = path(
        flags.client_cert,
        ["MESHWORK_CLIENT_CERT", "CONSUL_CLIENT_CERT"],
    );
    let key = path(
        flags.client_key,
        ["MESHWORK_CLIENT_KEY", "CONSUL_CLIENT_KEY"],
    );
    tls.client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(CtlError::Usage(
                "a client certificate needs its key and the other way round: give both \
                 --client-cert and --client-key (or MESHWORK_CLIENT_CERT and MESHWORK_CLIENT_KEY)"
                    .into(),
            ));
        }
    };
    tls.server_name = match flags.tls_server_name {
        Some(name) => (!name.is_empty()).then_some(name),
        None => first(["MESHWORK_TLS_SERVER_NAME", "CONSUL_TLS_SERVER_NAME"]),
    };
    Ok(endpoint)
}

/// A boolean as Go's `strconv.ParseBool` reads it (Consul's CLI does).
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// What the client dials HTTPS with: the files read and checked once.
pub struct Tls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    /// With a client certificate (for the hints).
    has_client_cert: bool,
}

/// Only the name: the configuration holds the client's private key.
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .field("has_client_cert", &self.has_client_cert)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files for HTTPS to `endpoint`; what is wrong is one line,
    /// which never shows key material.
    pub fn load(files: &TlsFiles, endpoint: &Endpoint) -> Result<Self, CtlError> {
        let usage = |message: String| CtlError::Usage(message);
        let Some(ca_file) = &files.ca_file else {
            return Err(usage(format!(
                "HTTPS to {} needs the CA that signed the registry's certificate: pass --ca-file FILE \
                 (or set MESHWORK_CACERT or CONSUL_CACERT); meshctl trusts no system certificates",
                endpoint.addr
            )));
        };
        let name = files
            .server_name
            .clone()
            .unwrap_or_else(|| endpoint.host().to_owned());
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            usage(format!(
                "invalid TLS server name {name:?}: want a DNS name or an IP address (--tls-server-name)"
            ))
        })?;
        // ring rather than aws-lc-rs: no C/CMake build in the tree (as the
        // registry and the sidecar). Its only loss is the post-quantum key
        // exchange, which is why rustls marks it deprecated.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca_file, "CA file (--ca-file)")? {
            roots.add(cert).map_err(|e| {
                usage(format!(
                    "{}: not a usable CA certificate: {e}",
                    ca_file.display()
                ))
            })?;
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| usage(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let mut config = match &files.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert, "client certificate (--client-cert)")?;
                let key_der = read_key(key)?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    usage(format!(
                        "{} and {} do not go together (--client-cert, --client-key): {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            server_name,
            has_client_cert: files.client.is_some(),
        })
    }

    /// The client side of the handshake on `tcp`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(self.server_name.clone(), tcp)
            .await
    }

    /// A failed handshake with `addr` as one line. The certificates not
    /// fitting (ours or the registry's) or a peer that does not speak TLS
    /// is bad usage; the connection dropping is an unreachable registry.
    pub fn handshake_error(&self, addr: &str, error: &std::io::Error) -> CtlError {
        match tls_cause(error) {
            Some(tls) => self.refused(addr, tls),
            None => CtlError::Unreachable(format!(
                "TLS handshake with {addr} failed: {error} (is {addr} the registry's HTTPS port?)"
            )),
        }
    }

    /// The TLS refusal behind a failed request, if that is what it was.
    /// With TLS 1.3 the registry checks our certificate after our side of
    /// the handshake is done, so its refusal arrives instead of an answer;
    /// it read no request then.
    pub fn refusal(
        &self,
        addr: &str,
        error: &(dyn std::error::Error + 'static),
    ) -> Option<CtlError> {
        use rustls::AlertDescription as Alert;
        match tls_cause(error)? {
            tls @ rustls::Error::AlertReceived(
                Alert::CertificateRequired
                | Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::CertificateUnknown
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::UnsupportedCertificate
                | Alert::AccessDenied
                | Alert::HandshakeFailure,
            ) => Some(self.refused(addr, tls)),
            _ => None,
        }
    }

    fn refused(&self, addr: &str, error: &rustls::Error) -> CtlError {
        use rustls::AlertDescription as Alert;
        use rustls::CertificateError as Cert;
        use rustls::Error as E;
        let hint = match error {
            E::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
                " (is --ca-file the registry's CA?)"
            }
            E::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
                " (the name checked is the address's host or --tls-server-name; \
                 `meshctl tls cert create --server` certificates carry server.<DC>.meshwork, \
                 localhost and 127.0.0.1)"
            }
            E::InvalidCertificate(
                Cert::Expired
                | Cert::ExpiredContext { .. }
                | Cert::NotValidYet
                | Cert::NotValidYetContext { .. },
            ) => " (check the registry's certificate dates and this machine's clock)",
            E::AlertReceived(Alert::CertificateRequired) => {
                " (the registry requires a client certificate: pass --client-cert and --client-key)"
            }
            E::AlertReceived(
                Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::CertificateUnknown
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::UnsupportedCertificate
                | Alert::AccessDenied,
            ) => {
                if self.has_client_cert {
                    " (the registry refused the client certificate: --client-cert must be \
                     a valid certificate from the registry's CA)"
                } else {
                    " (the registry requires a client certificate from its CA: pass \
                     --client-cert and --client-key)"
                }
            }
            E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
                " (is it the registry's HTTPS port? its plain HTTP port takes http://)"
            }
            _ => "",
        };
        CtlError::Usage(format!("TLS handshake with {addr} failed: {error}{hint}"))
    }
}

/// The rustls error behind `error`, through its sources and any
/// `io::Error` wrapping it.
fn tls_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// The PEM certificates in `path`, at least one.
fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, CtlError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, what, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(path, what, e))?;
    if certs.is_empty() {
        return Err(CtlError::Usage(format!(
            "the {what} {} holds no certificate (expected PEM \"BEGIN CERTIFICATE\")",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in `path`. What is wrong with it is said without its
/// content (PEM errors can quote lines of the file).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CtlError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => CtlError::Usage(format!(
            "the client key (--client-key) {} holds no PEM private key",
            path.display()
        )),
        pem::Error::Io(e) => CtlError::Usage(format!(
            "cannot read the client key (--client-key) {}: {e}",
            path.display()
        )),
        _ => CtlError::Usage(format!(
            "the client key (--client-key) {} is not a valid PEM private key",
            path.display()
        )),
    })
}

fn pem_error(path: &Path, what: &str, error: pem::Error) -> CtlError {
    match error {
        pem::Error::Io(e) => {
            CtlError::Usage(format!("cannot read the {what} {}: {e}", path.display()))
        }
        e => CtlError::Usage(format!(
            "the {what} {} is not PEM certificates: {e}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn resolved(flags: Flags, vars: &'static [(&'static str, &'static str)]) -> Endpoint {
        resolve(flags, env_of(vars)).expect("resolves")
    }

    fn tls_of(endpoint: Endpoint) -> TlsFiles {
        endpoint.tls.expect("HTTPS")
    }

    fn plain() -> Result<bool, CtlError> {
        Ok(false)
    }

    #[test]
    fn the_scheme_selects_tls_and_is_taken_off() {
        for (addr, host_port, https) in [
            ("127.0.0.1:8500", "127.0.0.1:8500", false),
            ("http://127.0.0.1:8500", "127.0.0.1:8500", false),
            ("http://127.0.0.1:8500/", "127.0.0.1:8500", false),
            ("https://127.0.0.1:8501", "127.0.0.1:8501", true),
            (" HTTPS://localhost:8501/ ", "localhost:8501", true),
            ("https://[::1]:8501", "[::1]:8501", true),
        ] {
            let endpoint = Endpoint::parse(addr, plain).expect(addr);
            assert_eq!(endpoint.addr, host_port, "{addr}");
            assert_eq!(endpoint.tls.is_some(), https, "{addr}");
        }
        for bad in [
            "",
            "https://",
            "https://:8501",
            "https://host",
            "https://host:99999",
            "https://host:8501/v1",
            "unix:///tmp/consul.sock",
            "ftp://host:21",
        ] {
            let e = Endpoint::parse(bad, plain).expect_err(bad);
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("https://HOST:PORT"), "{e}");
        }
    }

    #[test]
    fn the_host_is_the_default_server_name() {
        for (addr, host) in [
            ("https://localhost:8501", "localhost"),
            ("https://127.0.0.1:8501", "127.0.0.1"),
            ("https://[::1]:8501", "::1"),
        ] {
            assert_eq!(Endpoint::parse(addr, plain).expect(addr).host(), host);
        }
    }

    #[test]
    fn http_ssl_makes_a_scheme_less_address_tls_but_no_explicit_scheme() {
        let ssl = |value: &'static str| -> &'static [(&'static str, &'static str)] {
            match value {
                "true" => &[("CONSUL_HTTP_SSL", "true")],
                "1" => &[("MESHWORK_HTTP_SSL", "1")],
                _ => &[("CONSUL_HTTP_SSL", "false")],
            }
        };
        let flags = |addr: &str| Flags {
            http_addr: Some(addr.to_owned()),
            ..Flags::default()
        };
        assert!(resolved(flags("h:8501"), ssl("true")).tls.is_some());
        assert!(resolved(flags("h:8501"), ssl("1")).tls.is_some());
        assert!(resolved(flags("h:8501"), ssl("false")).tls.is_none());
        assert!(resolved(flags("http://h:8500"), ssl("true")).tls.is_none());
        assert!(
            resolved(flags("https://h:8501"), ssl("false"))
                .tls
                .is_some()
        );
        // No address at all: the default, over TLS when asked.
        let endpoint = resolved(Flags::default(), ssl("true"));
        assert_eq!(endpoint.addr, DEFAULT_ADDR);
        assert!(endpoint.tls.is_some());
        // MESHWORK_ first; an empty one is unset.
        let both: &[(&str, &str)] = &[("MESHWORK_HTTP_SSL", "false"), ("CONSUL_HTTP_SSL", "true")];
        assert!(resolved(flags("h:1"), both).tls.is_none());
        let empty: &[(&str, &str)] = &[("MESHWORK_HTTP_SSL", ""), ("CONSUL_HTTP_SSL", "true")];
        assert!(resolved(flags("h:1"), empty).tls.is_some());
        // A bad value is refused, but only when it is needed.
        let bad: &[(&str, &str)] = &[("CONSUL_HTTP_SSL", "yes")];
        let e = resolve(flags("h:1"), env_of(bad)).expect_err("bad bool");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("CONSUL_HTTP_SSL \"yes\""), "{e}");
        assert!(resolve(flags("https://h:1"), env_of(bad)).is_ok());
    }

    #[test]
    fn the_flag_wins_then_meshwork_then_consul() {
        const ALL: &[(&str, &str)] = &[
            ("MESHWORK_HTTP_ADDR", "https://meshwork:8501"),
            ("CONSUL_HTTP_ADDR", "https://consul:8501"),
            ("MESHWORK_CACERT", "meshwork-ca.pem"),
            ("CONSUL_CACERT", "consul-ca.pem"),
            ("MESHWORK_CLIENT_CERT", "meshwork-cert.pem"),
            ("CONSUL_CLIENT_CERT", "consul-cert.pem"),
            ("MESHWORK_CLIENT_KEY", "meshwork-key.pem"),
            ("CONSUL_CLIENT_KEY", "consul-key.pem"),
            ("MESHWORK_TLS_SERVER_NAME", "meshwork.name"),
            ("CONSUL_TLS_SERVER_NAME", "consul.name"),
        ];
        const CONSUL: &[(&str, &str)] = &[
            ("MESHWORK_HTTP_ADDR", ""),
            ("CONSUL_HTTP_ADDR", "https://consul:8501"),
            ("MESHWORK_CACERT", ""),
            ("CONSUL_CACERT", "consul-ca.pem"),
            ("CONSUL_CLIENT_CERT", "consul-cert.pem"),
            ("CONSUL_CLIENT_KEY", "consul-key.pem"),
            ("CONSUL_TLS_SERVER_NAME", "consul.name"),
        ];
        let flags = Flags {
            http_addr: Some("https://flag:8501".into()),
            ca_file: Some("flag-ca.pem".into()),
            client_cert: Some("flag-cert.pem".into()),
            client_key: Some("flag-key.pem".into()),
            tls_server_name: Some("flag.name".into()),
        };
        let endpoint = resolved(flags, ALL);
        assert_eq!(endpoint.addr, "flag:8501");
        assert_eq!(
            tls_of(endpoint),
            TlsFiles {
                ca_file: Some("flag-ca.pem".into()),
                client: Some(("flag-cert.pem".into(), "flag-key.pem".into())),
                server_name: Some("flag.name".into()),
            }
        );

        let endpoint = resolved(Flags::default(), ALL);
        assert_eq!(endpoint.addr, "meshwork:8501");
        assert_eq!(
            tls_of(endpoint),
            TlsFiles {
                ca_file: Some("meshwork-ca.pem".into()),
                client: Some(("meshwork-cert.pem".into(), "meshwork-key.pem".into())),
                server_name: Some("meshwork.name".into()),
            }
        );

        let endpoint = resolved(Flags::default(), CONSUL);
        assert_eq!(endpoint.addr, "consul:8501");
        assert_eq!(
            tls_of(endpoint),
            TlsFiles {
                ca_file: Some("consul-ca.pem".into()),
                client: Some(("consul-cert.pem".into(), "consul-key.pem".into())),
                server_name: Some("consul.name".into()),
            }
        );

        // An empty flag means "none", even over a variable.
        let none = Flags {
            ca_file: Some(PathBuf::new()),
            client_cert: Some(PathBuf::new()),
            client_key: Some(PathBuf::new()),
            tls_server_name: Some(String::new()),
            ..Flags::default()
        };
        assert_eq!(tls_of(resolved(none, ALL)), TlsFiles::default());

        // Nothing set: plain HTTP to the default address.
        let endpoint = resolved(Flags::default(), &[]);
        assert_eq!(endpoint.addr, DEFAULT_ADDR);
        assert_eq!(endpoint.tls, None);
    }

    #[test]
    fn plain_http_reads_no_tls_setting() {
        const VARS: &[(&str, &str)] = &[
            ("MESHWORK_HTTP_ADDR", "http://127.0.0.1:8500"),
            ("MESHWORK_CACERT", "/no/such/ca.pem"),
            ("MESHWORK_CLIENT_CERT", "/no/such/cert.pem"),
        ];
        let endpoint = resolved(Flags::default(), VARS);
        assert_eq!(endpoint.tls, None);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        const VARS: &[(&str, &str)] = &[
            ("MESHWORK_HTTP_ADDR", "https://h:8501"),
            ("CONSUL_CLIENT_KEY", "key.pem"),
        ];
        let e = resolve(
            Flags {
                client_key: Some(PathBuf::new()),
                client_cert: Some("cert.pem".into()),
                ..Flags::default()
            },
            env_of(VARS),
        )
        .expect_err("no key");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--client-key"), "{e}");
        let e = resolve(Flags::default(), env_of(VARS)).expect_err("no cert");
        assert!(e.to_string().contains("--client-cert"), "{e}");
    }

    #[test]
    fn https_without_a_ca_file_is_refused_in_one_line() {
        let endpoint = Endpoint::parse("https://127.0.0.1:8501", plain).expect("parses");
        let e = Tls::load(&TlsFiles::default(), &endpoint).expect_err("no CA");
        assert_eq!(e.exit_code(), 2);
        let message = e.to_string();
        assert!(message.contains("--ca-file"), "{message}");
        assert!(message.contains("127.0.0.1:8501"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }

    #[test]
    fn bad_files_are_one_line_usage_errors_that_show_no_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = Endpoint::parse("https://localhost:8501", plain).expect("parses");
        let secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n!!not base64!!\n";
        let key = dir.path().join("key.pem");
        std::fs::write(&key, secret).expect("write");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello\n").expect("write");
        let missing = dir.path().join("missing.pem");
        let files = |ca: &Path, client: Option<(&Path, &Path)>, name: Option<&str>| TlsFiles {
            ca_file: Some(ca.to_owned()),
            client: client.map(|(c, k)| (c.to_owned(), k.to_owned())),
            server_name: name.map(str::to_owned),
        };
        for (case, files, want) in [
            ("missing CA", files(&missing, None, None), "missing.pem"),
            (
                "no CA cert",
                files(&not_pem, None, None),
                "holds no certificate",
            ),
            ("key as CA", files(&key, None, None), "key.pem"),
            (
                "bad server name",
                files(&not_pem, None, Some("no such name!")),
                "--tls-server-name",
            ),
        ] {
            let e = Tls::load(&files, &endpoint).expect_err(case);
            let message = e.to_string();
            assert_eq!(e.exit_code(), 2, "{case}: {message}");
            assert_eq!(message.lines().count(), 1, "{case}: {message}");
            assert!(message.contains(want), "{case}: {message}");
            assert!(!message.contains("c2VjcmV0"), "{case}: {message}");
        }
        let e = read_key(&key).expect_err("bad key");
        let message = e.to_string();
        assert!(message.contains("not a valid PEM private key"), "{message}");
        assert!(!message.contains("c2VjcmV0"), "{message}");
        assert!(!message.contains("not base64"), "{message}");
        let e = read_key(&not_pem).expect_err("no key");
        assert!(e.to_string().contains("holds no PEM private key"), "{e}");
        let e = read_key(&missing).expect_err("missing key");
        assert!(
            e.to_string().starts_with("cannot read the client key"),
            "{e}"
        );
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner.clone());
        assert_eq!(tls_cause(&io), Some(&inner));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(tls_cause(&plain), None);
    }
}
