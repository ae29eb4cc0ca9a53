//! `meshctl tls …`: a cluster's TLS material without an OpenSSL recipe,
//! as `consul tls ca create` and `consul tls cert create` make it — a CA,
//! then server and client certificates signed by it, ECDSA P-256 keys.
//!
//! Nothing here talks to the registry: the commands read and write local
//! files only. Files are written whole or not at all (a temporary file in
//! the same folder, synced, then renamed without replacing anything); key
//! files are created with mode 0600 and are never printed.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use serde_json::json;
use time::OffsetDateTime;

use super::{CtlError, io_err, print_json};

const DAY_SECS: i64 = 86_400;

#[derive(Debug, Subcommand)]
pub(crate) enum TlsCommand {
    /// Create a certificate authority (CA) for the cluster's TLS.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Create server and client certificates signed by that CA.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a CA: writes <DOMAIN>-agent-ca.pem (the CA certificate, to
    /// give every server and client) and <DOMAIN>-agent-ca-key.pem (its
    /// private key, mode 0600: keep it off the cluster's machines).
    ///
    /// Existing files are never overwritten. The key is ECDSA P-256; the
    /// certificate is valid from a minute ago for --days days.
    Create(CaCreate),
}

#[derive(Debug, Subcommand)]
pub(crate) enum CertCommand {
    /// Create a server (--server) or client (--client) certificate and
    /// key, signed by the CA made with `meshctl tls ca create`.
    ///
    /// Writes <DC>-server-<DOMAIN>-<N>.pem and <DC>-server-<DOMAIN>-<N>-key.pem
    /// (or <DC>-client-…), N being the first number from 0 whose files do
    /// not exist yet; key files have mode 0600.
    ///
    /// A server certificate names server.<DC>.<DOMAIN>, localhost and
    /// 127.0.0.1 (and <NODE>.server.<DC>.<DOMAIN> with --node) and serves
    /// both TLS servers and clients: servers talk to each other with
    /// mutual TLS. It lets its holder act as a server, with access to all
    /// the cluster's data: keep it as safe as the CA key, on servers only.
    /// A client certificate names client.<DC>.<DOMAIN> and localhost and is
    /// for TLS clients only.
    Create(CertCreate),
}

#[derive(Debug, Args)]
pub(crate) struct CaCreate {
    /// The cluster's domain; it names the files, <DOMAIN>-agent-ca.pem.
    #[arg(long, default_value = "meshwork")]
    domain: String,
    /// How long the CA is valid, in days.
    #[arg(long, default_value = "1825", value_name = "DAYS")]
    days: String,
    /// The CA's common name [default: Meshwork Agent CA <random number>].
    #[arg(long = "common-name", value_name = "NAME")]
    common_name: Option<String>,
    /// Write the files into this existing folder [default: the current
    /// folder].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CertCreate {
    /// A server certificate (TLS server and client use).
    #[arg(long)]
    server: bool,
    /// A client certificate (TLS client use only).
    #[arg(long)]
    client: bool,
    /// The datacenter the certificate is for.
    #[arg(long, default_value = "dc1")]
    dc: String,
    /// The cluster's domain.
    #[arg(long, default_value = "meshwork")]
    domain: String,
    /// The CA certificate [default: <DOMAIN>-agent-ca.pem, in --dir if
    /// given].
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The CA's private key [default: <DOMAIN>-agent-ca-key.pem, in --dir
    /// if given].
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// How long the certificate is valid, in days.
    #[arg(long, default_value = "365", value_name = "DAYS")]
    days: String,
    /// Another DNS name for the certificate (repeatable; `*.` wildcards
    /// allowed).
    #[arg(long = "additional-dnsname", value_name = "NAME")]
    additional_dnsnames: Vec<String>,
    /// Another IP address for the certificate (repeatable).
    #[arg(long = "additional-ipaddress", value_name = "IP")]
    additional_ipaddresses: Vec<String>,
    /// With --server: also name <NODE>.server.<DC>.<DOMAIN>.
    #[arg(long, value_name = "NODE")]
    node: Option<String>,
    /// Write the files into this existing folder [default: the current
    /// folder].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Runs one `tls` command, printing the files it saved to `out`.
pub(crate) fn run(cmd: TlsCommand, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    match cmd {
        TlsCommand::Ca(CaCommand::Create(args)) => {
            let saved = ca_create(&args, unix_now()?)?;
            if json {
                return print_json(
                    out,
                    &json!({
                        "Certificate": saved.cert.display().to_string(),
                        "Key": saved.key.display().to_string(),
                    }),
                );
            }
            writeln!(out, "==> Saved {}", saved.cert.display()).map_err(io_err)?;
            writeln!(out, "==> Saved {}", saved.key.display()).map_err(io_err)
        }
        TlsCommand::Cert(CertCommand::Create(args)) => {
            let made = cert_create(&args, unix_now()?)?;
            if let Some(warning) = &made.warning {
                eprintln!("meshctl: warning: {warning}");
            }
            if json {
                return print_json(
                    out,
                    &json!({
                        "Certificate": made.saved.cert.display().to_string(),
                        "Key": made.saved.key.display().to_string(),
                        "CA": made.ca_cert.display().to_string(),
                    }),
                );
            }
            writeln!(
                out,
                "==> Using {} and {}",
                made.ca_cert.display(),
                made.ca_key.display()
            )
            .map_err(io_err)?;
            writeln!(out, "==> Saved {}", made.saved.cert.display()).map_err(io_err)?;
            writeln!(out, "==> Saved {}", made.saved.key.display()).map_err(io_err)
        }
    }
}

/// The two files a command wrote.
#[derive(Debug)]
struct Saved {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug)]
struct MadeCert {
    saved: Saved,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    /// Something the operator should know, though the files were saved.
    warning: Option<String>,
}

fn usage(message: String) -> CtlError {
    CtlError::Usage(message)
}

fn unix_now() -> Result<i64, CtlError> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .ok_or_else(|| CtlError::Server("the system clock is before 1970".to_owned()))
}

/// `--days`: a whole number of days, at least 1.
fn parse_days(text: &str) -> Result<u32, CtlError> {
    match text.trim().parse::<u32>() {
        Ok(days) if days > 0 => Ok(days),
        _ => Err(usage(format!(
            "invalid --days {text:?}: want a whole number of days, at least 1"
        ))),
    }
}

/// From a minute ago (clocks differ a little) to `days` days from now.
fn validity(now: i64, days: u32) -> Result<(OffsetDateTime, OffsetDateTime), CtlError> {
    let too_far = || usage(format!("--days {days} reaches past the year 9999"));
    let not_before = OffsetDateTime::from_unix_timestamp(now - 60)
        .map_err(|_| CtlError::Server("the system clock is out of range".to_owned()))?;
    let end = now
        .checked_add(i64::from(days) * DAY_SECS)
        .ok_or_else(too_far)?;
    let not_after = OffsetDateTime::from_unix_timestamp(end).map_err(|_| too_far())?;
    if not_after.year() > 9999 {
        return Err(too_far());
    }
    Ok((not_before, not_after))
}

/// A random positive 127-bit serial number (RFC 5280 allows 20 bytes).
fn random_serial() -> u128 {
    (rand::random::<u128>() >> 1).max(1)
}

/// Checks a DNS name: dot-separated labels of letters, digits, `-` and
/// `_` (1 to 63 characters, no `-` at either end); with `wildcard`, the
/// first label may be `*`.
fn check_dns_name(what: &str, name: &str, wildcard: bool) -> Result<(), CtlError> {
    let bad = |why: &str| usage(format!("invalid {what} {name:?}: {why}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad("want a DNS name of 1 to 253 characters"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(bad("an IP address is not a DNS name"));
    }
    for (i, label) in name.split('.').enumerate() {
        if wildcard && i == 0 && label == "*" && name.len() > 2 {
            continue;
        }
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if label.is_empty()
            || label.len() > 63
            || !ok_chars
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad(
                "each dot-separated label wants 1 to 63 letters, digits, '-' or '_'",
            ));
        }
    }
    Ok(())
}

fn target_dir(dir: Option<&Path>) -> Result<&Path, CtlError> {
    let dir = dir.unwrap_or_else(|| Path::new("."));
    if !dir.is_dir() {
        return Err(usage(format!("--dir {}: no such directory", dir.display())));
    }
    Ok(dir)
}

/// The path of `name` in `dir`, shown as the operator would type it.
fn in_dir(dir: Option<&Path>, name: &str) -> PathBuf {
    dir.map_or_else(|| PathBuf::from(name), |d| d.join(name))
}

/// True unless `path` certainly does not exist (a dangling symbolic link
/// or an unreadable entry counts as there).
fn taken(path: &Path) -> bool {
    !matches!(path.symlink_metadata(), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

fn ca_create(args: &CaCreate, now: i64) -> Result<Saved, CtlError> {
    check_dns_name("--domain", &args.domain, false)?;
    let days = parse_days(&args.days)?;
    let (not_before, not_after) = validity(now, days)?;
    let serial = random_serial();
    let common_name = match &args.common_name {
        Some(name) => {
            let name = name.trim();
            if name.is_empty() || name.chars().count() > 64 {
                return Err(usage(format!(
                    "invalid --common-name {name:?}: want 1 to 64 characters"
                )));
            }
            name.to_owned()
        }
        None => format!("Meshwork Agent CA {serial}"),
    };
    let dir = target_dir(args.dir.as_deref())?;
    let cert_path = in_dir(
        args.dir.as_deref(),
        &format!("{}-agent-ca.pem", args.domain),
    );
    let key_path = in_dir(
        args.dir.as_deref(),
        &format!("{}-agent-ca-key.pem", args.domain),
    );
    for path in [&cert_path, &key_path] {
        if taken(path) {
            return Err(usage(format!(
                "{} already exists; not overwritten (remove it or choose another --dir)",
                path.display()
            )));
        }
    }

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CtlError::Server(format!("cannot generate a key: {e}")))?;
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name);
    params.distinguished_name = subject;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CtlError::Server(format!("cannot make the CA certificate: {e}")))?;

    save_new(
        dir,
        &[
            NewFile {
                path: &cert_path,
                bytes: cert.pem().as_bytes(),
                secret: false,
            },
            NewFile {
                path: &key_path,
                bytes: key.serialize_pem().as_bytes(),
                secret: true,
            },
        ],
    )?;
    Ok(Saved {
        cert: cert_path,
        key: key_path,
    })
}

fn cert_create(args: &CertCreate, now: i64) -> Result<MadeCert, CtlError> {
    let kind = match (args.server, args.client) {
        (true, false) => "server",
        (false, true) => "client",
        _ => {
            return Err(usage(
                "give exactly one of --server and --client".to_owned(),
            ));
        }
    };
    if args.node.is_some() && !args.server {
        return Err(usage("--node goes with --server only".to_owned()));
    }
    check_dns_name("--domain", &args.domain, false)?;
    if args.dc.contains('.') {
        return Err(usage(format!(
            "invalid --dc {:?}: a datacenter name has no dots",
            args.dc
        )));
    }
    check_dns_name("--dc", &args.dc, false)?;
    let days = parse_days(&args.days)?;
    let (not_before, not_after) = validity(now, days)?;

    let base = format!("{}.{}.{}", kind, args.dc, args.domain);
    let mut dns_names = vec![base.clone(), "localhost".to_owned()];
    if let Some(node) = &args.node {
        check_dns_name("--node", node, false)?;
        dns_names.push(format!("{node}.{base}"));
    }
    check_dns_name("name", &base, false)?;
    for name in &args.additional_dnsnames {
        check_dns_name("--additional-dnsname", name, true)?;
        if !dns_names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            dns_names.push(name.clone());
        }
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    if args.server {
        ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    for text in &args.additional_ipaddresses {
        let ip: IpAddr = text.trim().parse().map_err(|_| {
            usage(format!(
                "invalid --additional-ipaddress {text:?}: want an IPv4 or IPv6 address"
            ))
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }

    let dir = target_dir(args.dir.as_deref())?;
    let ca_cert_path = args.ca.clone().unwrap_or_else(|| {
        in_dir(
            args.dir.as_deref(),
            &format!("{}-agent-ca.pem", args.domain),
        )
    });
    let ca_key_path = args.key.clone().unwrap_or_else(|| {
        in_dir(
            args.dir.as_deref(),
            &format!("{}-agent-ca-key.pem", args.domain),
        )
    });
    let ca = load_ca(&ca_cert_path, &ca_key_path, now)?;
    let warning = (ca.not_after < not_after.unix_timestamp()).then(|| {
        format!(
            "the CA {} expires on {}, before this certificate: the certificate stops verifying then",
            ca_cert_path.display(),
            ca.not_after_text
        )
    });

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CtlError::Server(format!("cannot generate a key: {e}")))?;
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial().to_be_bytes()));
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, base.clone());
    params.distinguished_name = subject;
    let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
    for name in dns_names {
        let ia5 = name
            .as_str()
            .try_into()
            .map_err(|_| usage(format!("invalid DNS name {name:?}")))?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.into_iter().map(SanType::IpAddress));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if args.server {
        // Servers are clients of each other too (Raft, internal gRPC).
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|e| CtlError::Server(format!("cannot sign the certificate: {e}")))?;

    let prefix = format!("{}-{}-{}", args.dc, kind, args.domain);
    let (cert_path, key_path) = (0..10_000)
        .map(|n| {
            (
                in_dir(args.dir.as_deref(), &format!("{prefix}-{n}.pem")),
                in_dir(args.dir.as_deref(), &format!("{prefix}-{n}-key.pem")),
            )
        })
        .find(|(cert, key)| !taken(cert) && !taken(key))
        .ok_or_else(|| {
            usage(format!(
                "{} holds too many {prefix}-N.pem files",
                dir.display()
            ))
        })?;
    save_new(
        dir,
        &[
            NewFile {
                path: &cert_path,
                bytes: cert.pem().as_bytes(),
                secret: false,
            },
            NewFile {
                path: &key_path,
                bytes: key.serialize_pem().as_bytes(),
                secret: true,
            },
        ],
    )?;
    Ok(MadeCert {
        saved: Saved {
            cert: cert_path,
            key: key_path,
        },
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        warning,
    })
}

/// A CA read from its files, ready to sign.
struct LoadedCa {
    issuer: Issuer<'static, KeyPair>,
    not_after: i64,
    not_after_text: String,
}

/// Reads the CA certificate and key, and checks that the key is the
/// certificate's, that the certificate is a CA's and has not expired.
/// No message repeats any of the key file's content.
fn load_ca(cert_path: &Path, key_path: &Path, now: i64) -> Result<LoadedCa, CtlError> {
    let cert_file = std::fs::read(cert_path).map_err(|e| {
        usage(format!(
            "cannot read the CA certificate {}: {e} (create a CA with `meshctl tls ca create`, or give --ca)",
            cert_path.display()
        ))
    })?;
    let cert_der = pem_blocks(&cert_file)
        .into_iter()
        .find(|(label, _)| label == "CERTIFICATE")
        .map(|(_, der)| der)
        .ok_or_else(|| usage(format!("{} holds no PEM certificate", cert_path.display())))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
        usage(format!(
            "{} holds a damaged certificate: {e}",
            cert_path.display()
        ))
    })?;
    if !x509.is_ca() {
        return Err(usage(format!(
            "{} is not a CA certificate (its basic constraints do not say CA:TRUE)",
            cert_path.display()
        )));
    }
    if let Ok(Some(usage_ext)) = x509.key_usage()
        && !usage_ext.value.key_cert_sign()
    {
        return Err(usage(format!(
            "{} is not allowed to sign certificates (no keyCertSign key usage)",
            cert_path.display()
        )));
    }
    let not_after = x509.validity().not_after;
    if not_after.timestamp() <= now {
        return Err(usage(format!(
            "the CA {} expired on {not_after}",
            cert_path.display()
        )));
    }

    let key_file = std::fs::read(key_path).map_err(|e| {
        usage(format!(
            "cannot read the CA key {}: {e} (give --key)",
            key_path.display()
        ))
    })?;
    let no_key = || {
        usage(format!(
            "{} holds no usable private key (want an unencrypted PKCS#8 or EC key in PEM)",
            key_path.display()
        ))
    };
    let (label, der) = pem_blocks(&key_file)
        .into_iter()
        .find(|(label, _)| label.ends_with("PRIVATE KEY"))
        .ok_or_else(no_key)?;
    let pkcs8 = match label.as_str() {
        "PRIVATE KEY" => der,
        "EC PRIVATE KEY" => sec1_to_pkcs8(&der).ok_or_else(|| {
            usage(format!(
                "{}: unsupported EC key (want a P-256 or P-384 key with its public key)",
                key_path.display()
            ))
        })?,
        "ENCRYPTED PRIVATE KEY" => {
            return Err(usage(format!(
                "{} is encrypted; meshctl needs the key unencrypted",
                key_path.display()
            )));
        }
        _ => {
            return Err(usage(format!(
                "{}: unsupported key format {label:?} (convert it to PKCS#8: openssl pkcs8 -topk8 -nocrypt)",
                key_path.display()
            )));
        }
    };
    let key = KeyPair::try_from(pkcs8.as_slice()).map_err(|_| no_key())?;
    if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
        return Err(usage(format!(
            "the CA key {} does not belong to the CA certificate {}",
            key_path.display(),
            cert_path.display()
        )));
    }
    let not_after_text = not_after.to_string();
    let not_after = not_after.timestamp();
    let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key).map_err(|e| {
        usage(format!(
            "{} cannot be used to sign: {e}",
            cert_path.display()
        ))
    })?;
    Ok(LoadedCa {
        issuer,
        not_after,
        not_after_text,
    })
}

/// The PEM blocks of a file, as (label, DER bytes); a damaged block ends
/// the list.
fn pem_blocks(file: &[u8]) -> Vec<(String, Vec<u8>)> {
    x509_parser::pem::Pem::iter_from_buffer(file)
        .map_while(Result::ok)
        .map(|pem| (pem.label, pem.contents))
        .collect()
}

/// One DER element: (tag, contents, the rest of `input`).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x83 => {
            let n = usize::from(first & 0x7f);
            if rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b));
            (len, &rest[n..])
        }
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// One DER element from its tag and contents.
fn der_element(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Wraps a SEC1 `EC PRIVATE KEY` (what Consul and `openssl ecparam` write)
/// in PKCS#8, the form ring reads: the curve goes into the algorithm and
/// out of the inner key, whose public key ring requires.
fn sec1_to_pkcs8(sec1: &[u8]) -> Option<Vec<u8>> {
    let (0x30, body, []) = der_next(sec1)? else {
        return None;
    };
    let (0x02, [1], rest) = der_next(body)? else {
        return None;
    };
    let (0x04, private, mut rest) = der_next(rest)? else {
        return None;
    };
    let mut curve = None;
    if let Some((0xa0, params, after)) = der_next(rest) {
        curve = Some(params);
        rest = after;
    }
    let (0xa1, _, after) = der_next(rest)? else {
        return None;
    };
    let public = &rest[..rest.len() - after.len()];
    if !after.is_empty() {
        return None;
    }
    let curve = match curve {
        Some(oid) => oid,
        None if private.len() == 32 => OID_P256,
        None if private.len() == 48 => OID_P384,
        None => return None,
    };
    if curve != OID_P256 && curve != OID_P384 {
        return None;
    }
    let inner = der_element(
        0x30,
        &[
            der_element(0x02, &[1]),
            der_element(0x04, private),
            public.to_vec(),
        ]
        .concat(),
    );
    let algorithm = der_element(0x30, &[OID_EC_PUBLIC_KEY, curve].concat());
    Some(der_element(
        0x30,
        &[
            der_element(0x02, &[0]),
            algorithm,
            der_element(0x04, &inner),
        ]
        .concat(),
    ))
}

/// A file to create: its path, content, and whether it is a private key
/// (mode 0600 from its creation on).
struct NewFile<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    secret: bool,
}

/// Writes each file whole through a synced temporary file in `dir` and a
/// rename that replaces nothing; if one cannot be saved, those already
/// saved are removed again, so a command leaves all its files or none.
fn save_new(dir: &Path, files: &[NewFile<'_>]) -> Result<(), CtlError> {
    let mut staged = Vec::with_capacity(files.len());
    for file in files {
        staged.push(stage(dir, file)?);
    }
    let mut done: Vec<&Path> = Vec::new();
    for (tmp, file) in staged.into_iter().zip(files) {
        if let Err(e) = tmp.persist_noclobber(file.path) {
            for path in &done {
                let _ = std::fs::remove_file(path);
            }
            return Err(if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                usage(format!(
                    "{} already exists; not overwritten",
                    file.path.display()
                ))
            } else {
                usage(format!("cannot write {}: {}", file.path.display(), e.error))
            });
        }
        done.push(file.path);
    }
    // The renames themselves made durable; a file system that cannot sync
    // a folder still has the files.
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    Ok(())
}

fn stage(dir: &Path, file: &NewFile<'_>) -> Result<tempfile::NamedTempFile, CtlError> {
    let fail = |e: std::io::Error| usage(format!("cannot write {}: {e}", file.path.display()));
    let mut builder = tempfile::Builder::new();
    builder.prefix(".meshctl-tls-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if file.secret { 0o600 } else { 0o644 };
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(fail)?;
    #[cfg(unix)]
    if file.secret {
        // Exactly 0600, whatever the umask; it was never more open.
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    tmp.write_all(file.bytes).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use clap::Parser;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

    use super::*;

    /// Runs meshctl's own dispatch on `args`: its result and its output.
    fn meshctl(args: &[&str]) -> (Result<(), CtlError>, String) {
        let cli =
            crate::Cli::try_parse_from(std::iter::once("meshctl").chain(args.iter().copied()))
                .expect("parses");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut out = Vec::new();
        let result = runtime.block_on(crate::run(cli, &mut out));
        (result, String::from_utf8(out).expect("utf-8 output"))
    }

    fn ok(args: &[&str]) -> String {
        let (result, out) = meshctl(args);
        if let Err(e) = result {
            panic!("meshctl {args:?} failed: {e}");
        }
        assert!(!out.contains("PRIVATE KEY"), "{out}");
        out
    }

    /// A usage error (exit code 2) on one line, without key material.
    fn refused(args: &[&str]) -> String {
        let (result, out) = meshctl(args);
        let e = result.expect_err("refused");
        assert_eq!(e.exit_code(), 2, "{e}");
        let message = e.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(!message.contains("PRIVATE KEY"), "{message}");
        assert!(out.is_empty(), "{out}");
        message
    }

    fn path_str(path: &Path) -> &str {
        path.to_str().expect("utf-8 path")
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("a PEM certificate")
    }

    fn verify(ca: &Path, leaf: &Path, usage: webpki::KeyUsage) -> Result<(), webpki::Error> {
        let ca = cert_der(ca);
        let anchor = webpki::anchor_from_trusted_cert(&ca).expect("a trust anchor");
        let leaf = cert_der(leaf);
        let leaf = webpki::EndEntityCert::try_from(&leaf).expect("an end-entity certificate");
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    fn valid_for(leaf: &Path, name: &str) -> bool {
        let leaf = cert_der(leaf);
        let leaf = webpki::EndEntityCert::try_from(&leaf).expect("an end-entity certificate");
        let name = ServerName::try_from(name).expect("a server name");
        leaf.verify_is_valid_for_subject_name(&name).is_ok()
    }

    /// The key file holds the private key of the certificate's public key.
    fn assert_key_matches(cert: &Path, key: &Path) {
        let pem = std::fs::read_to_string(key).expect("key file");
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("rustls reads the key");
        let key = KeyPair::from_pem(&pem).expect("a PKCS#8 key");
        let der = cert_der(cert);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("certificate");
        assert_eq!(
            key.public_key_raw(),
            x509.public_key().subject_public_key.data.as_ref()
        );
        assert!(key.is_compatible(&PKCS_ECDSA_P256_SHA256));
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_ca_then_server_and_client_certificates_that_chain_to_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let d = path_str(dir);
        let out = ok(&["tls", "ca", "create", "--dir", d]);
        let ca = dir.join("meshwork-agent-ca.pem");
        let ca_key = dir.join("meshwork-agent-ca-key.pem");
        assert_eq!(
            out,
            format!(
                "==> Saved {}\n==> Saved {}\n",
                ca.display(),
                ca_key.display()
            )
        );
        assert_key_matches(&ca, &ca_key);

        let out = ok(&[
            "tls",
            "cert",
            "create",
            "--server",
            "--dir",
            d,
            "--node",
            "node-1",
            "--additional-dnsname",
            "registry.example.com",
            "--additional-ipaddress",
            "10.0.0.5",
            "--additional-ipaddress",
            "::1",
        ]);
        let server = dir.join("dc1-server-meshwork-0.pem");
        let server_key = dir.join("dc1-server-meshwork-0-key.pem");
        assert!(
            out.ends_with(&format!(
                "==> Saved {}\n==> Saved {}\n",
                server.display(),
                server_key.display()
            )),
            "{out}"
        );
        assert!(out.starts_with("==> Using "), "{out}");
        assert_key_matches(&server, &server_key);
        verify(&ca, &server, webpki::KeyUsage::server_auth()).expect("server auth");
        // Servers are clients of each other (Raft, internal gRPC).
        verify(&ca, &server, webpki::KeyUsage::client_auth()).expect("client auth");
        for name in [
            "server.dc1.meshwork",
            "localhost",
            "node-1.server.dc1.meshwork",
            "registry.example.com",
            "127.0.0.1",
            "10.0.0.5",
            "::1",
        ] {
            assert!(valid_for(&server, name), "{name}");
        }
        for name in ["client.dc1.meshwork", "server.dc2.meshwork", "10.0.0.6"] {
            assert!(!valid_for(&server, name), "{name}");
        }

        ok(&["tls", "cert", "create", "--client", "--dir", d]);
        let client = dir.join("dc1-client-meshwork-0.pem");
        let client_key = dir.join("dc1-client-meshwork-0-key.pem");
        assert_key_matches(&client, &client_key);
        verify(&ca, &client, webpki::KeyUsage::client_auth()).expect("client auth");
        assert!(matches!(
            verify(&ca, &client, webpki::KeyUsage::server_auth()),
            Err(webpki::Error::RequiredEkuNotFoundContext(_))
        ));
        assert!(valid_for(&client, "client.dc1.meshwork"));
        assert!(valid_for(&client, "localhost"));
        assert!(!valid_for(&client, "server.dc1.meshwork"));
        assert!(!valid_for(&client, "127.0.0.1"));

        // Other datacenters and domains name the files and the names.
        ok(&[
            "tls", "cert", "create", "--server", "--dir", d, "--dc", "eu-west", "--domain",
            "meshwork",
        ]);
        let eu = dir.join("eu-west-server-meshwork-0.pem");
        verify(&ca, &eu, webpki::KeyUsage::server_auth()).expect("server auth");
        assert!(valid_for(&eu, "server.eu-west.meshwork"));
        assert!(!valid_for(&eu, "server.dc1.meshwork"));

        #[cfg(unix)]
        for (path, secret) in [
            (&ca, false),
            (&ca_key, true),
            (&server, false),
            (&server_key, true),
            (&client, false),
            (&client_key, true),
        ] {
            if secret {
                assert_eq!(mode(path), 0o600, "{}", path.display());
            } else {
                assert_eq!(mode(path) & 0o600, 0o600, "{}", path.display());
                assert_eq!(mode(path) & 0o022, 0, "{}", path.display());
            }
        }
        // Nothing else is left behind (no temporary file).
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "dc1-client-meshwork-0-key.pem",
                "dc1-client-meshwork-0.pem",
                "dc1-server-meshwork-0-key.pem",
                "dc1-server-meshwork-0.pem",
                "eu-west-server-meshwork-0-key.pem",
                "eu-west-server-meshwork-0.pem",
                "meshwork-agent-ca-key.pem",
                "meshwork-agent-ca.pem",
            ]
        );
    }

    #[test]
    fn the_ca_has_a_random_serial_in_its_name_and_the_asked_validity() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = path_str(tmp.path());
        let before = unix_now().expect("now");
        ok(&["tls", "ca", "create", "--dir", d, "--days", "30"]);
        let der = cert_der(&tmp.path().join("meshwork-agent-ca.pem"));
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("certificate");
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .expect("a common name")
            .to_owned();
        let number = cn
            .strip_prefix("Meshwork Agent CA ")
            .expect("the default name");
        let serial = x509
            .raw_serial()
            .iter()
            .fold(0u128, |n, &b| (n << 8) | u128::from(b));
        assert_eq!(number, serial.to_string());
        assert!(serial > 0);
        assert!(x509.is_ca());
        let bc = x509
            .basic_constraints()
            .expect("basic constraints")
            .expect("present");
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, None);
        let ku = x509.key_usage().expect("key usage").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
        let validity = x509.validity();
        let not_before = validity.not_before.timestamp();
        let not_after = validity.not_after.timestamp();
        assert!(
            (before - 65..=before - 55).contains(&not_before),
            "{not_before}"
        );
        assert!(
            (not_before + 60 + 30 * DAY_SECS..=not_before + 65 + 30 * DAY_SECS)
                .contains(&not_after),
            "{not_after}"
        );

        let other = tempfile::tempdir().expect("tempdir");
        ok(&[
            "tls",
            "ca",
            "create",
            "--dir",
            path_str(other.path()),
            "--common-name",
            "Example Ops CA",
            "--domain",
            "example",
        ]);
        let der = cert_der(&other.path().join("example-agent-ca.pem"));
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("certificate");
        assert_eq!(x509.subject().to_string(), "CN=Example Ops CA");
        assert_ne!(x509.raw_serial(), serial.to_be_bytes());
    }

    #[test]
    fn a_second_ca_create_refuses_and_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = path_str(tmp.path());
        ok(&["tls", "ca", "create", "--dir", d]);
        let ca = tmp.path().join("meshwork-agent-ca.pem");
        let key = tmp.path().join("meshwork-agent-ca-key.pem");
        let (ca_before, key_before) = (
            std::fs::read(&ca).expect("ca"),
            std::fs::read(&key).expect("key"),
        );
        let message = refused(&["tls", "ca", "create", "--dir", d]);
        assert!(message.contains("already exists"), "{message}");
        assert_eq!(std::fs::read(&ca).expect("ca"), ca_before);
        assert_eq!(std::fs::read(&key).expect("key"), key_before);

        // The key alone there is enough to refuse, and nothing is written.
        let lone = tempfile::tempdir().expect("tempdir");
        std::fs::write(lone.path().join("meshwork-agent-ca-key.pem"), "x").expect("write");
        let message = refused(&["tls", "ca", "create", "--dir", path_str(lone.path())]);
        assert!(
            message.contains("meshwork-agent-ca-key.pem already exists"),
            "{message}"
        );
        assert!(!lone.path().join("meshwork-agent-ca.pem").exists());
    }

    #[test]
    fn certificate_numbers_go_up_and_skip_taken_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = path_str(tmp.path());
        ok(&["tls", "ca", "create", "--dir", d]);
        // A key file alone takes its number too.
        std::fs::write(tmp.path().join("dc1-server-meshwork-1-key.pem"), "x").expect("write");
        for _ in 0..3 {
            ok(&["tls", "cert", "create", "--server", "--dir", d]);
        }
        ok(&["tls", "cert", "create", "--client", "--dir", d]);
        for name in [
            "dc1-server-meshwork-0",
            "dc1-server-meshwork-2",
            "dc1-server-meshwork-3",
            "dc1-client-meshwork-0",
        ] {
            let cert = tmp.path().join(format!("{name}.pem"));
            assert_key_matches(&cert, &tmp.path().join(format!("{name}-key.pem")));
        }
        assert!(!tmp.path().join("dc1-server-meshwork-1.pem").exists());
        assert_eq!(
            std::fs::read(tmp.path().join("dc1-server-meshwork-1-key.pem")).expect("kept"),
            b"x"
        );
        assert!(!tmp.path().join("dc1-client-meshwork-1.pem").exists());
    }

    #[test]
    fn a_certificate_from_another_ca_does_not_verify() {
        let (one, two) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        for dir in [&one, &two] {
            let d = path_str(dir.path());
            ok(&["tls", "ca", "create", "--dir", d]);
            ok(&["tls", "cert", "create", "--server", "--dir", d]);
        }
        let ca_one = one.path().join("meshwork-agent-ca.pem");
        let server_two = two.path().join("dc1-server-meshwork-0.pem");
        verify(
            &ca_one,
            &one.path().join("dc1-server-meshwork-0.pem"),
            webpki::KeyUsage::server_auth(),
        )
        .expect("its own CA");
        assert!(matches!(
            verify(&ca_one, &server_two, webpki::KeyUsage::server_auth()),
            Err(webpki::Error::UnknownIssuer)
        ));
        // Same CA name, other key: the signature does not check out.
        let imposter = tempfile::tempdir().expect("tempdir");
        let d = path_str(imposter.path());
        let ca_name = {
            let der = cert_der(&ca_one);
            let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("certificate");
            x509.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .expect("cn")
                .to_owned()
        };
        ok(&["tls", "ca", "create", "--dir", d, "--common-name", &ca_name]);
        ok(&["tls", "cert", "create", "--server", "--dir", d]);
        assert!(
            verify(
                &ca_one,
                &imposter.path().join("dc1-server-meshwork-0.pem"),
                webpki::KeyUsage::server_auth()
            )
            .is_err()
        );
    }

    #[test]
    fn bad_input_is_a_one_line_usage_error_and_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = path_str(tmp.path());
        let other = tempfile::tempdir().expect("tempdir");
        ok(&["tls", "ca", "create", "--dir", d]);
        ok(&["tls", "ca", "create", "--dir", path_str(other.path())]);
        let ca = tmp.path().join("meshwork-agent-ca.pem");
        let ca_key = tmp.path().join("meshwork-agent-ca-key.pem");
        let other_key = other.path().join("meshwork-agent-ca-key.pem");
        let garbage = tmp.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let bad_der = tmp.path().join("bad-der.pem");
        std::fs::write(
            &bad_der,
            "-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let key_secret = std::fs::read_to_string(&ca_key).expect("key");
        let cert = |extra: &[&str]| {
            let mut args = vec!["tls", "cert", "create", "--dir", d];
            args.extend_from_slice(extra);
            refused(&args)
        };
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec![], "exactly one of --server and --client"),
            (
                vec!["--server", "--client"],
                "exactly one of --server and --client",
            ),
            (
                vec!["--client", "--node", "n1"],
                "--node goes with --server",
            ),
            (vec!["--server", "--days", "0"], "invalid --days"),
            (vec!["--server", "--days=-3"], "invalid --days"),
            (vec!["--server", "--days", "99999999"], "past the year 9999"),
            (
                vec!["--server", "--additional-ipaddress", "10.0.0"],
                "invalid --additional-ipaddress",
            ),
            (
                vec!["--server", "--additional-dnsname", "bad name"],
                "invalid --additional-dnsname",
            ),
            (
                vec!["--server", "--additional-dnsname", "10.0.0.1"],
                "not a DNS name",
            ),
            (vec!["--server", "--dc", "a.b"], "invalid --dc"),
            (vec!["--server", "--dc", "../x"], "invalid --dc"),
            (vec!["--server", "--domain", "a/b"], "invalid --domain"),
            (vec!["--server", "--node=-n"], "invalid --node"),
            (
                vec!["--server", "--ca", "/nonexistent/ca.pem"],
                "cannot read the CA certificate",
            ),
            (
                vec!["--server", "--key", "/nonexistent/key.pem"],
                "cannot read the CA key",
            ),
            (
                vec!["--server", "--ca", path_str(&ca_key)],
                "holds no PEM certificate",
            ),
            (
                vec!["--server", "--ca", path_str(&garbage)],
                "holds no PEM certificate",
            ),
            (
                vec!["--server", "--ca", path_str(&bad_der)],
                "damaged certificate",
            ),
            (
                vec!["--server", "--key", path_str(&ca)],
                "holds no usable private key",
            ),
            (
                vec!["--server", "--key", path_str(&other_key)],
                "does not belong to the CA certificate",
            ),
        ];
        for (extra, want) in cases {
            let message = cert(&extra);
            assert!(message.contains(want), "{extra:?}: {message}");
            assert!(
                !message.contains(key_secret.lines().nth(1).expect("base64")),
                "{message}"
            );
        }
        // A leaf certificate is no CA.
        ok(&[
            "tls",
            "cert",
            "create",
            "--server",
            "--dir",
            path_str(other.path()),
        ]);
        let leaf = other.path().join("dc1-server-meshwork-0.pem");
        let leaf_key = other.path().join("dc1-server-meshwork-0-key.pem");
        let message = cert(&[
            "--server",
            "--ca",
            path_str(&leaf),
            "--key",
            path_str(&leaf_key),
        ]);
        assert!(message.contains("is not a CA certificate"), "{message}");
        // Nothing was written by any of those.
        let count = std::fs::read_dir(tmp.path()).expect("read_dir").count();
        assert_eq!(count, 4);

        for (args, want) in [
            (
                vec!["tls", "ca", "create", "--dir", "/nonexistent/dir"],
                "no such directory",
            ),
            (vec!["tls", "ca", "create", "--days", "0"], "invalid --days"),
            (vec!["tls", "ca", "create", "--days", "x"], "invalid --days"),
            (
                vec!["tls", "ca", "create", "--domain", ""],
                "invalid --domain",
            ),
            (
                vec!["tls", "ca", "create", "--common-name", " "],
                "invalid --common-name",
            ),
        ] {
            let message = refused(&args);
            assert!(message.contains(want), "{args:?}: {message}");
        }
    }

    #[test]
    fn tls_needs_no_registry_address_token_or_timeout() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = path_str(tmp.path());
        ok(&[
            "--http-addr",
            "not an address",
            "--timeout",
            "soon",
            "--token-file",
            "/nonexistent/token",
            "tls",
            "ca",
            "create",
            "--dir",
            d,
        ]);
        let out = ok(&["--json", "tls", "cert", "create", "--client", "--dir", d]);
        let value: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            value["Key"],
            tmp.path()
                .join("dc1-client-meshwork-0-key.pem")
                .display()
                .to_string()
        );
    }

    #[test]
    fn sec1_keys_are_read_as_pkcs8() {
        // ring's PKCS#8 holds a SEC1 key without its curve: take it out,
        // add the curve as Consul and OpenSSL write it, and read it back.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let pkcs8 = key.serialize_der();
        let (_, body, _) = der_next(&pkcs8).expect("sequence");
        let (_, _, rest) = der_next(body).expect("version");
        let (_, _, rest) = der_next(rest).expect("algorithm");
        let (0x04, sec1, _) = der_next(rest).expect("key") else {
            panic!("no octet string");
        };
        let (_, inner, _) = der_next(sec1).expect("ec private key");
        let (_, _, after_version) = der_next(inner).expect("version");
        let (_, _, after_private) = der_next(after_version).expect("private");
        let head = &inner[..inner.len() - after_private.len()];
        let with_curve = der_element(
            0x30,
            &[head, &der_element(0xa0, OID_P256), after_private].concat(),
        );
        for sec1 in [sec1.to_vec(), with_curve] {
            let converted = sec1_to_pkcs8(&sec1).expect("converted");
            let back = KeyPair::try_from(converted.as_slice()).expect("ring reads it");
            assert_eq!(back.public_key_raw(), key.public_key_raw());
        }
        assert!(sec1_to_pkcs8(b"").is_none());
        assert!(sec1_to_pkcs8(&pkcs8).is_none());
        let other_curve = der_element(
            0x30,
            &[
                head,
                &der_element(0xa0, &[0x06, 0x03, 0x2b, 0x65, 0x70]),
                after_private,
            ]
            .concat(),
        );
        assert!(sec1_to_pkcs8(&other_curve).is_none());
    }

    #[test]
    fn dns_names_are_checked() {
        for name in ["meshwork", "a.b-c.d_e", "x1", "Server.DC1.meshwork"] {
            check_dns_name("n", name, false).expect(name);
        }
        check_dns_name("n", "*.example.com", true).expect("wildcard");
        for name in [
            "",
            ".",
            "a..b",
            "a.",
            "-a",
            "a-",
            "a b",
            "a/b",
            "*.example.com",
            "é",
            "1.2.3.4",
            "::1",
        ] {
            assert!(check_dns_name("n", name, false).is_err(), "{name:?}");
        }
        assert!(check_dns_name("n", "*", true).is_err());
        assert!(check_dns_name("n", "a.*.b", true).is_err());
        assert!(check_dns_name("n", &"a".repeat(64), false).is_err());
    }

    /// `openssl` where it is installed: reads the files as OpenSSL does.
    /// Its output is kept, never printed unless an assertion fails, and
    /// it is never given a key to print.
    fn openssl(args: &[&str]) -> Option<(bool, String)> {
        let output = Command::new("openssl").args(args).output().ok()?;
        Some((
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ))
    }

    #[test]
    fn openssl_reads_and_verifies_the_certificates() {
        if openssl(&["version"]).is_none() {
            eprintln!("openssl is not installed: check skipped");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let d = path_str(dir);
        ok(&["tls", "ca", "create", "--dir", d]);
        ok(&[
            "tls", "cert", "create", "--server", "--dir", d, "--node", "n1",
        ]);
        ok(&["tls", "cert", "create", "--client", "--dir", d]);
        let ca = dir.join("meshwork-agent-ca.pem");
        let server = dir.join("dc1-server-meshwork-0.pem");
        let client = dir.join("dc1-client-meshwork-0.pem");
        let text = |path: &Path| {
            let (ok, text) =
                openssl(&["x509", "-noout", "-text", "-in", path_str(path)]).expect("openssl");
            assert!(ok, "{text}");
            text
        };
        let ca_text = text(&ca);
        for want in [
            "CA:TRUE",
            "Digital Signature, Certificate Sign, CRL Sign",
            "Subject: CN = Meshwork Agent CA ",
            "NIST CURVE: P-256",
            "ecdsa-with-SHA256",
        ] {
            assert!(ca_text.contains(want), "{want}\n{ca_text}");
        }
        let server_text = text(&server);
        for want in [
            "CA:FALSE",
            "Subject: CN = server.dc1.meshwork",
            "DNS:server.dc1.meshwork, DNS:localhost, DNS:n1.server.dc1.meshwork, IP Address:127.0.0.1",
            "TLS Web Server Authentication, TLS Web Client Authentication",
            "Digital Signature",
            "NIST CURVE: P-256",
        ] {
            assert!(server_text.contains(want), "{want}\n{server_text}");
        }
        let client_text = text(&client);
        assert!(
            client_text.contains("DNS:client.dc1.meshwork, DNS:localhost"),
            "{client_text}"
        );
        assert!(
            client_text.contains("TLS Web Client Authentication"),
            "{client_text}"
        );
        assert!(
            !client_text.contains("TLS Web Server Authentication"),
            "{client_text}"
        );

        let check = |purpose: &str, leaf: &Path| {
            openssl(&[
                "verify",
                "-CAfile",
                path_str(&ca),
                "-purpose",
                purpose,
                path_str(leaf),
            ])
            .expect("openssl")
        };
        for (purpose, leaf, want) in [
            ("sslserver", &server, true),
            ("sslclient", &server, true),
            ("sslclient", &client, true),
            ("sslserver", &client, false),
        ] {
            let (ok, text) = check(purpose, leaf);
            assert_eq!(ok, want, "{purpose} {}: {text}", leaf.display());
        }
    }

    #[test]
    fn a_ca_made_by_openssl_signs_too() {
        if openssl(&["version"]).is_none() {
            eprintln!("openssl is not installed: check skipped");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let key = dir.join("ca-key.pem");
        let ca = dir.join("ca.pem");
        // `ecparam -genkey` writes EC PARAMETERS then a SEC1 EC PRIVATE KEY,
        // as Consul's CA key is.
        let (made, text) = openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-out",
            path_str(&key),
        ])
        .expect("openssl");
        assert!(made, "{text}");
        let (made, text) = openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            path_str(&key),
            "-subj",
            "/CN=OpenSSL CA",
            "-days",
            "30",
            "-out",
            path_str(&ca),
        ])
        .expect("openssl");
        assert!(made, "{text}");
        ok(&[
            "tls",
            "cert",
            "create",
            "--server",
            "--dir",
            path_str(dir),
            "--ca",
            path_str(&ca),
            "--key",
            path_str(&key),
            "--days",
            "10",
        ]);
        let server = dir.join("dc1-server-meshwork-0.pem");
        verify(&ca, &server, webpki::KeyUsage::server_auth()).expect("verifies");
        let (verified, text) =
            openssl(&["verify", "-CAfile", path_str(&ca), path_str(&server)]).expect("openssl");
        assert!(verified, "{text}");
    }
}
