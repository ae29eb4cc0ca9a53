//! Consul's `jwt-provider` config entry, read: who issues the JSON Web
//! Tokens a gateway listener accepts and where their keys are. The
//! registry checks an entry with [`parse`] at `PUT`; a gateway reads the
//! providers its listeners name with it (the signature checks are the
//! gateway's, `meshwork_sidecar::gateway::jwt`).
//!
//! As Consul has it: `Issuer` (the `iss` a token must carry, when set),
//! `Audiences` (one of them in `aud`, when set), `JSONWebKeySet` with
//! `Local` (`JWKS`, the set base64-encoded, or `Filename`) or `Remote`
//! (`URI`, HTTPS only; `RequestTimeoutMs`; `CacheDuration`, how often the
//! set is fetched again; `JWKSCluster.TLSCertificates.TrustedCA`, the CA
//! for the key server, else the system's), `Locations` (an `Authorization:
//! Bearer` header by default, or a `Header`, `QueryParam` or `Cookie`),
//! `Forwarding` (the verified payload to the service in a header) and
//! `ClockSkewSeconds` (default 30). Meshwork adds `ClaimToHeaders`: claims
//! of a verified token passed to the service as headers (Envoy's
//! `claim_to_headers`).

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::intentions::fields::{array, boolean, fields, join, nonempty_string, object};

/// The config-entry kind.
pub const KIND: &str = "jwt-provider";

/// Its fields (Consul's, and Meshwork's `ClaimToHeaders`: claims to the
/// service as headers).
pub const FIELDS: [&str; 8] = [
    "Issuer",
    "Audiences",
    "JSONWebKeySet",
    "Locations",
    "Forwarding",
    "ClockSkewSeconds",
    "CacheConfig",
    "ClaimToHeaders",
];

/// One provider, as a gateway uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub keys: Keys,
    /// Where the token is looked for, in order (the first found is
    /// verified).
    pub locations: Vec<Location>,
    /// The verified token's payload (base64url) to the service in this
    /// header.
    pub forward_payload: Option<String>,
    pub clock_skew: Duration,
    pub claim_headers: Vec<ClaimHeader>,
}

/// Where a provider's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    /// The key set itself (JSON text).
    Inline(String),
    /// A file holding the key set, read when the entry applies and on
    /// reload.
    File(String),
    Remote(Remote),
}

/// A key set fetched over HTTPS and refreshed in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub uri: String,
    pub timeout: Duration,
    /// How often the set is fetched again (Consul's `CacheDuration`,
    /// default 5 minutes).
    pub refresh: Duration,
    /// PEM of the CA that signed the key server's certificate (a file or
    /// inline); `None`: the system's roots.
    pub trusted_ca: Option<TrustedCa>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustedCa {
    File(String),
    Pem(String),
}

/// Where a token is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A header, its value after `prefix` (e.g. `Bearer `); `forward`
    /// keeps the header for the service (else it is removed).
    Header {
        name: String,
        prefix: String,
        forward: bool,
    },
    QueryParam(String),
    Cookie(String),
}

/// A claim passed to the service as a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHeader {
    /// The claim's path (`["sub"]`, `["org", "id"]`).
    pub claim: Vec<String>,
    pub header: String,
}

fn text(e: crate::intentions::IntentionError) -> String {
    e.to_string()
}

/// A header name a provider may read or write: an HTTP token, not a
/// pseudo-header and not one the proxy owns.
pub fn check_header_name(name: &str, at: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let token = !lower.is_empty()
        && lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("{at}: {name:?} is not a header name"));
    }
    if matches!(
        lower.as_str(),
        "host"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "trailer"
            | "content-length"
    ) {
        return Err(format!(
            "{at}: {name:?} is a header the proxy owns; use another name"
        ));
    }
    Ok(lower)
}

fn millis(value: Option<&Value>, at: &str) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(0) => Ok(None),
            Some(ms) => Ok(Some(Duration::from_millis(ms))),
            None => Err(format!("{at}: must be a number of milliseconds")),
        },
    }
}

fn trusted_ca(value: Option<&Value>, at: &str) -> Result<Option<TrustedCa>, String> {
    // JWKSCluster { DiscoveryType, ConnectTimeout, TLSCertificates { TrustedCA { Filename | InlineString } } }
    let Some(value) = value else {
        return Ok(None);
    };
    let cluster = object(value, at).map_err(text)?;
    let [discovery, _connect, certificates] = fields(
        cluster,
        &["DiscoveryType", "ConnectTimeout", "TLSCertificates"],
        at,
    )
    .map_err(text)?;
    if let Some(d) = nonempty_string(discovery, &join(at, "DiscoveryType")).map_err(text)?
        && !matches!(d, "STRICT_DNS" | "LOGICAL_DNS")
    {
        return Err(format!(
            "{at}.DiscoveryType: {d:?}: STRICT_DNS or LOGICAL_DNS"
        ));
    }
    let Some(certificates) = certificates else {
        return Ok(None);
    };
    let c_at = join(at, "TLSCertificates");
    let certificates = object(certificates, &c_at).map_err(text)?;
    let [provider, trusted] = fields(
        certificates,
        &["CaCertificateProviderInstance", "TrustedCA"],
        &c_at,
    )
    .map_err(text)?;
    if provider.is_some() {
        return Err(format!(
            "{c_at}.CaCertificateProviderInstance: not supported; give TrustedCA"
        ));
    }
    let Some(trusted) = trusted else {
        return Ok(None);
    };
    let t_at = join(&c_at, "TrustedCA");
    let trusted = object(trusted, &t_at).map_err(text)?;
    let [file, env, inline, bytes] = fields(
        trusted,
        &[
            "Filename",
            "EnvironmentVariable",
            "InlineString",
            "InlineBytes",
        ],
        &t_at,
    )
    .map_err(text)?;
    if env.is_some() || bytes.is_some() {
        return Err(format!(
            "{t_at}: give Filename or InlineString (EnvironmentVariable and InlineBytes are not supported)"
        ));
    }
    let file = nonempty_string(file, &join(&t_at, "Filename")).map_err(text)?;
    let inline = nonempty_string(inline, &join(&t_at, "InlineString")).map_err(text)?;
    match (file, inline) {
        (Some(f), None) => {
            if !f.starts_with('/') {
                return Err(format!("{t_at}.Filename: {f:?} must be an absolute path"));
            }
            Ok(Some(TrustedCa::File(f.to_owned())))
        }
        (None, Some(pem)) => {
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!("{t_at}.InlineString: not a PEM certificate"));
            }
            Ok(Some(TrustedCa::Pem(pem.to_owned())))
        }
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(format!("{t_at}: give Filename or InlineString, not both")),
    }
}

/// Checks a key set's JSON shape (`{"keys": [ {"kty": ...}, ... ]}`); the
/// keys themselves are read by the gateway.
pub fn check_jwks(text: &str, at: &str) -> Result<(), String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("{at}: not a JSON Web Key Set: {e}"))?;
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{at}: a JSON Web Key Set is an object with a \"keys\" list"))?;
    if keys.is_empty() {
        return Err(format!("{at}: the key set has no keys"));
    }
    for (i, k) in keys.iter().enumerate() {
        if k.get("kty").and_then(Value::as_str).is_none() {
            return Err(format!("{at}: keys[{i}] has no \"kty\""));
        }
    }
    Ok(())
}

fn keys(value: Option<&Value>, at: &str) -> Result<Keys, String> {
    let value = value.ok_or_else(|| format!("{at}: required (Local or Remote)"))?;
    let set = object(value, at).map_err(text)?;
    let [local, remote] = fields(set, &["Local", "Remote"], at).map_err(text)?;
    match (local, remote) {
        (Some(local), None) => {
            let l_at = join(at, "Local");
            let local = object(local, &l_at).map_err(text)?;
            let [jwks, file] = fields(local, &["JWKS", "Filename"], &l_at).map_err(text)?;
            let jwks = nonempty_string(jwks, &join(&l_at, "JWKS")).map_err(text)?;
            let file = nonempty_string(file, &join(&l_at, "Filename")).map_err(text)?;
            match (jwks, file) {
                (Some(b64), None) => {
                    let j_at = join(&l_at, "JWKS");
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map_err(|e| format!("{j_at}: not base64: {e}"))?;
                    let json = String::from_utf8(bytes)
                        .map_err(|_| format!("{j_at}: the decoded key set is not UTF-8"))?;
                    check_jwks(&json, &j_at)?;
                    Ok(Keys::Inline(json))
                }
                (None, Some(f)) => {
                    if !f.starts_with('/') {
                        return Err(format!("{l_at}.Filename: {f:?} must be an absolute path"));
                    }
                    Ok(Keys::File(f.to_owned()))
                }
                _ => Err(format!("{l_at}: give exactly one of JWKS or Filename")),
            }
        }
        (None, Some(remote)) => {
            let r_at = join(at, "Remote");
            let remote = object(remote, &r_at).map_err(text)?;
            let [uri, timeout, cache, _asynchronously, _retry, cluster] = fields(
                remote,
                &[
                    "URI",
                    "RequestTimeoutMs",
                    "CacheDuration",
                    "FetchAsynchronously",
                    "RetryPolicy",
                    "JWKSCluster",
                ],
                &r_at,
            )
            .map_err(text)?;
            let uri = nonempty_string(uri, &join(&r_at, "URI"))
                .map_err(text)?
                .ok_or_else(|| format!("{r_at}.URI: required"))?;
            let rest = uri.strip_prefix("https://").ok_or_else(|| {
                format!("{r_at}.URI: {uri:?}: the key set is fetched over HTTPS only")
            })?;
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.is_empty() || authority.contains('@') || uri.contains(char::is_whitespace)
            {
                return Err(format!(
                    "{r_at}.URI: {uri:?} is not an https:// URL with a host"
                ));
            }
            let refresh = match nonempty_string(cache, &join(&r_at, "CacheDuration"))
                .map_err(text)?
            {
                None => Duration::from_secs(300),
                Some(d) => crate::duration::parse_duration(d)
                    .filter(|d| *d >= Duration::from_secs(1))
                    .ok_or_else(|| {
                        format!("{r_at}.CacheDuration: {d:?}: a duration of 1s or more (\"5m\")")
                    })?,
            };
            let timeout = millis(timeout, &join(&r_at, "RequestTimeoutMs"))?
                .unwrap_or(Duration::from_secs(5));
            if timeout > Duration::from_secs(60) {
                return Err(format!("{r_at}.RequestTimeoutMs: at most 60000"));
            }
            Ok(Keys::Remote(Remote {
                uri: uri.to_owned(),
                timeout,
                refresh,
                trusted_ca: trusted_ca(cluster, &join(&r_at, "JWKSCluster"))?,
            }))
        }
        _ => Err(format!("{at}: give exactly one of Local or Remote")),
    }
}

fn locations(value: Option<&Value>, at: &str) -> Result<Vec<Location>, String> {
    let mut out = Vec::new();
    for (i, l) in array(value, at).map_err(text)?.iter().enumerate() {
        let l_at = format!("{at}[{i}]");
        let l = object(l, &l_at).map_err(text)?;
        let [header, query, cookie] =
            fields(l, &["Header", "QueryParam", "Cookie"], &l_at).map_err(text)?;
        let one = match (header, query, cookie) {
            (Some(h), None, None) => {
                let h_at = join(&l_at, "Header");
                let h = object(h, &h_at).map_err(text)?;
                let [name, prefix, forward] =
                    fields(h, &["Name", "ValuePrefix", "Forward"], &h_at).map_err(text)?;
                let name = nonempty_string(name, &join(&h_at, "Name"))
                    .map_err(text)?
                    .ok_or_else(|| format!("{h_at}.Name: required"))?;
                Location::Header {
                    name: check_header_name(name, &join(&h_at, "Name"))?,
                    prefix: nonempty_string(prefix, &join(&h_at, "ValuePrefix"))
                        .map_err(text)?
                        .unwrap_or_default()
                        .to_owned(),
                    forward: boolean(forward, &join(&h_at, "Forward")).map_err(text)?,
                }
            }
            (None, Some(q), None) => {
                let q_at = join(&l_at, "QueryParam");
                let q = object(q, &q_at).map_err(text)?;
                let [name] = fields(q, &["Name"], &q_at).map_err(text)?;
                Location::QueryParam(
                    nonempty_string(name, &join(&q_at, "Name"))
                        .map_err(text)?
                        .ok_or_else(|| format!("{q_at}.Name: required"))?
                        .to_owned(),
                )
            }
            (None, None, Some(c)) => {
                let c_at = join(&l_at, "Cookie");
                let c = object(c, &c_at).map_err(text)?;
                let [name] = fields(c, &["Name"], &c_at).map_err(text)?;
                Location::Cookie(
                    nonempty_string(name, &join(&c_at, "Name"))
                        .map_err(text)?
                        .ok_or_else(|| format!("{c_at}.Name: required"))?
                        .to_owned(),
                )
            }
            _ => {
                return Err(format!(
                    "{l_at}: give exactly one of Header, QueryParam or Cookie"
                ));
            }
        };
        out.push(one);
    }
    if out.is_empty() {
        out.push(Location::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
            forward: false,
        });
    }
    Ok(out)
}

/// The provider `name` from its entry's body; errors name the field.
pub fn parse(name: &str, body: &Map<String, Value>) -> Result<Provider, String> {
    let path = format!("jwt-provider {name:?}");
    let body: Map<String, Value> = body
        .iter()
        .filter(|(k, _)| !matches!(k.to_ascii_lowercase().as_str(), "kind" | "name" | "meta"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let [
        issuer,
        audiences,
        jwks,
        locations_v,
        forwarding,
        skew,
        _cache,
        claim_headers,
    ] = fields(&body, &FIELDS, &path).map_err(text)?;
    let issuer = nonempty_string(issuer, &join(&path, "Issuer"))
        .map_err(text)?
        .map(str::to_owned);
    let mut aud = Vec::new();
    for (i, a) in array(audiences, &join(&path, "Audiences"))
        .map_err(text)?
        .iter()
        .enumerate()
    {
        match a.as_str() {
            Some(a) if !a.is_empty() => aud.push(a.to_owned()),
            _ => return Err(format!("{path}.Audiences[{i}]: must be a non-empty string")),
        }
    }
    let forward_payload = match forwarding {
        None => None,
        Some(f) => {
            let f_at = join(&path, "Forwarding");
            let f = object(f, &f_at).map_err(text)?;
            let [header, pad] =
                fields(f, &["HeaderName", "PadForwardPayloadHeader"], &f_at).map_err(text)?;
            if boolean(pad, &join(&f_at, "PadForwardPayloadHeader")).map_err(text)? {
                return Err(format!(
                    "{f_at}.PadForwardPayloadHeader: padded payloads are not supported (base64url without padding is sent)"
                ));
            }
            nonempty_string(header, &join(&f_at, "HeaderName"))
                .map_err(text)?
                .map(|h| check_header_name(h, &join(&f_at, "HeaderName")))
                .transpose()?
        }
    };
    let clock_skew = match skew {
        None => Duration::from_secs(30),
        Some(v) => Duration::from_secs(
            v.as_u64()
                .filter(|s| *s <= 3600)
                .ok_or_else(|| format!("{path}.ClockSkewSeconds: 0 to 3600 seconds"))?,
        ),
    };
    let mut claims = Vec::new();
    for (i, c) in array(claim_headers, &join(&path, "ClaimToHeaders"))
        .map_err(text)?
        .iter()
        .enumerate()
    {
        let c_at = format!("{path}.ClaimToHeaders[{i}]");
        let c = object(c, &c_at).map_err(text)?;
        let [claim, header] = fields(c, &["Claim", "HeaderName"], &c_at).map_err(text)?;
        let claim = nonempty_string(claim, &join(&c_at, "Claim"))
            .map_err(text)?
            .ok_or_else(|| {
                format!("{c_at}.Claim: required (a claim name, or a path: \"org.id\")")
            })?;
        let header = nonempty_string(header, &join(&c_at, "HeaderName"))
            .map_err(text)?
            .ok_or_else(|| format!("{c_at}.HeaderName: required"))?;
        let header = check_header_name(header, &join(&c_at, "HeaderName"))?;
        if claims.iter().any(|c: &ClaimHeader| c.header == header) {
            return Err(format!(
                "{c_at}.HeaderName: {header:?} is set by another claim"
            ));
        }
        claims.push(ClaimHeader {
            claim: claim.split('.').map(str::to_owned).collect(),
            header,
        });
    }
    Ok(Provider {
        name: name.to_owned(),
        issuer,
        audiences: aud,
        keys: keys(jwks, &join(&path, "JSONWebKeySet"))?,
        locations: locations(locations_v, &join(&path, "Locations"))?,
        forward_payload,
        clock_skew,
        claim_headers: claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    const JWKS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

    #[test]
    fn a_provider_is_read_as_consul_writes_it() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(JWKS);
        let p = parse(
            "okta",
            &body(json!({
                "Kind": "jwt-provider", "Name": "okta",
                "Issuer": "https://login.example.com",
                "Audiences": ["shop"],
                "JSONWebKeySet": {"Local": {"JWKS": b64}},
                "Locations": [{"Header": {"Name": "X-Token", "Forward": true}}],
                "Forwarding": {"HeaderName": "x-jwt-payload"},
                "ClockSkewSeconds": 10,
                "ClaimToHeaders": [{"Claim": "sub", "HeaderName": "x-user"}, {"Claim": "org.id", "HeaderName": "X-Org"}]
            })),
        )
        .expect("valid");
        assert_eq!(p.issuer.as_deref(), Some("https://login.example.com"));
        assert_eq!(p.keys, Keys::Inline(JWKS.into()));
        assert_eq!(p.clock_skew, Duration::from_secs(10));
        assert_eq!(p.claim_headers[1].claim, vec!["org", "id"]);
        assert_eq!(p.claim_headers[1].header, "x-org");
        assert_eq!(
            p.locations,
            vec![Location::Header {
                name: "x-token".into(),
                prefix: String::new(),
                forward: true
            }]
        );
        // Defaults: Authorization: Bearer, 30 s of skew.
        let p = parse(
            "remote",
            &body(json!({"JSONWebKeySet": {"Remote": {"URI": "https://idp.example.com/jwks", "CacheDuration": "10m"}}})),
        )
        .expect("valid");
        assert_eq!(p.clock_skew, Duration::from_secs(30));
        assert!(matches!(&p.keys, Keys::Remote(r) if r.refresh == Duration::from_secs(600)));
        assert!(
            matches!(&p.locations[0], Location::Header { name, prefix, .. } if name == "authorization" && prefix == "Bearer ")
        );
    }

    #[test]
    fn bad_providers_are_refused_naming_the_field() {
        for (entry, says) in [
            (json!({}), "JSONWebKeySet: required"),
            (
                json!({"JSONWebKeySet": {"Local": {"JWKS": "!!"}}}),
                "not base64",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"JWKS": "e30="}}}),
                "a JSON Web Key Set is an object",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"Filename": "keys.json"}}}),
                "absolute path",
            ),
            (
                json!({"JSONWebKeySet": {"Remote": {"URI": "http://idp/jwks"}}}),
                "over HTTPS only",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}, "Remote": {"URI": "https://idp/"}}}),
                "exactly one of Local or Remote",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}}, "ClaimToHeaders": [{"Claim": "sub", "HeaderName": "Host"}]}),
                "a header the proxy owns",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}}, "ClaimToHeaders": [{"Claim": "sub", "HeaderName": "x user"}]}),
                "not a header name",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}}, "Locations": [{"Header": {"Name": "a"}, "Cookie": {"Name": "b"}}]}),
                "exactly one of Header",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}}, "Issuer": 3}),
                "Issuer",
            ),
            (
                json!({"JSONWebKeySet": {"Local": {"Filename": "/k"}}, "Algorithms": ["RS256"]}),
                "unknown field",
            ),
        ] {
            let err = parse("p", &body(entry.clone())).expect_err(&entry.to_string());
            assert!(err.contains(says), "{entry}: {err}");
        }
    }
}
