//! JSON Web Tokens at the gateway: a provider's key set read from its
//! JWKS, and a token checked against it — signature (RS256/384/512,
//! PS256/384/512, ES256/384, EdDSA; never `none` or a shared-secret
//! HMAC), `exp` (required) and `nbf` with the provider's clock skew,
//! `iss` and `aud` when the provider names them, then the listener's
//! `VerifyClaims`. The `jsonwebtoken` crate does the cryptography (ring,
//! as rustls); which key may verify which algorithm is decided here, so a
//! key cannot be used with an algorithm of another family.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshwork_core::jwt_provider::Provider;
use serde_json::Value;

/// Longest token read (bytes); a longer one is refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// One usable key of a set.
struct Key {
    kid: Option<String>,
    /// The algorithm the JWK pins (`alg`), if any.
    alg: Option<Algorithm>,
    family: Family,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
}

fn family_of(alg: Algorithm) -> Option<Family> {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
        ES256 => Some(Family::P256),
        ES384 => Some(Family::P384),
        EdDSA => Some(Family::Ed25519),
        // Shared secrets have no place in a key set anyone may fetch.
        HS256 | HS384 | HS512 => None,
    }
}

/// A provider's keys, ready to verify with.
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn usable(jwk: &Jwk) -> Result<Option<Key>, String> {
    // A key meant for encryption only is not a signing key.
    if let Some(use_) = &jwk.common.public_key_use
        && !matches!(use_, jsonwebtoken::jwk::PublicKeyUse::Signature)
    {
        return Ok(None);
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Family::P256,
            EllipticCurve::P384 => Family::P384,
            _ => return Ok(None),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Family::Ed25519,
            _ => return Ok(None),
        },
        AlgorithmParameters::OctetKey(_) => return Ok(None),
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => match a.to_string().parse::<Algorithm>() {
            Ok(a) if family_of(a) == Some(family) => Some(a),
            // An encryption algorithm, or one of another family.
            _ => return Ok(None),
        },
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a key cannot be read: {e}"))?;
    Ok(Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        family,
        key,
    }))
}

impl KeySet {
    /// Reads a JWKS document; keys of kinds the gateway does not verify
    /// with (encryption keys, HMAC secrets, other curves) are skipped; a
    /// set with no usable key is an error.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        // Key by key: one of a kind the crate does not know (another
        // curve, a new key type) is skipped, not fatal to the others.
        let set: Value =
            serde_json::from_slice(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        let list = set
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JSON Web Key Set: no \"keys\" list")?;
        let mut keys = Vec::new();
        for one in list {
            let Ok(jwk) = serde_json::from_value::<Jwk>(one.clone()) else {
                continue;
            };
            // A key the crate reads but cannot use is skipped too.
            if let Ok(Some(key)) = usable(&jwk) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(
                "the key set has no signing key the gateway can use (RSA, P-256, P-384, Ed25519)"
                    .into(),
            );
        }
        Ok(Self { keys })
    }

    /// Keys in the set (never 0: such a set is refused).
    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}

/// Why a token was refused (the metric's label; the client is told only
/// `invalid_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooLarge,
    Malformed,
    /// `alg` is `none`, HMAC or unknown.
    Algorithm,
    /// No key of the set matches the token's `kid`/`alg`.
    NoKey,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// A `VerifyClaims` condition failed.
    Claims,
    /// A claim to be passed on as a header holds a value no header can
    /// carry (a line break, a control character).
    ClaimValue,
    /// The provider's keys are not loaded (yet, or any more).
    NoKeys,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::TooLarge => "too-large",
            Refused::Malformed => "malformed",
            Refused::Algorithm => "algorithm",
            Refused::NoKey => "unknown-key",
            Refused::Signature => "signature",
            Refused::Expired => "expired",
            Refused::NotYetValid => "not-yet-valid",
            Refused::Issuer => "issuer",
            Refused::Audience => "audience",
            Refused::Claims => "claims",
            Refused::ClaimValue => "claim-value",
            Refused::NoKeys => "no-keys",
        }
    }
}

fn header_alg(token: &str) -> Result<(Algorithm, Option<String>), Refused> {
    // The header decides the algorithm: read it first, refusing `none`
    // and anything unknown (the crate's header type has no `none`).
    let head = token.split('.').next().ok_or(Refused::Malformed)?;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .map_err(|_| Refused::Malformed)?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| Refused::Malformed)?;
    let alg = value
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(Refused::Malformed)?;
    let alg: Algorithm = alg.parse().map_err(|_| Refused::Algorithm)?;
    if family_of(alg).is_none() {
        return Err(Refused::Algorithm);
    }
    let kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
    Ok((alg, kid))
}

/// The claim at `path` of `claims`.
pub fn claim<'c>(claims: &'c Value, path: &[String]) -> Option<&'c Value> {
    path.iter().try_fold(claims, |v, step| v.get(step))
}

/// Checks `token` against `provider`'s `keys` and the listener's
/// `VerifyClaims`; the token's claims when it passes.
pub fn verify(
    token: &str,
    provider: &Provider,
    keys: &KeySet,
    required: &[(Vec<String>, String)],
) -> Result<Value, Refused> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refused::TooLarge);
    }
    if token.split('.').count() != 3 {
        return Err(Refused::Malformed);
    }
    let (alg, kid) = header_alg(token)?;
    let family = family_of(alg).ok_or(Refused::Algorithm)?;
    let mut validation = Validation::new(alg);
    validation.leeway = provider.clock_skew.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required_claims = vec!["exp"];
    if let Some(iss) = &provider.issuer {
        validation.set_issuer(&[iss]);
        required_claims.push("iss");
    }
    if provider.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&provider.audiences);
        required_claims.push("aud");
    }
    validation.set_required_spec_claims(&required_claims);
    let candidates = keys.keys.iter().filter(|k| {
        k.family == family
            && k.alg.is_none_or(|a| a == alg)
            && match (&kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                // A token without kid tries every key of its family; a
                // token naming a kid needs that key.
                (Some(_), None) => false,
                (None, _) => true,
            }
    });
    let mut last = Refused::NoKey;
    for key in candidates {
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
            Ok(data) => {
                let claims = data.claims;
                // One issuer, as a string: the crate accepts a list
                // holding the issuer among others.
                if provider.issuer.is_some() && !claims.get("iss").is_some_and(Value::is_string) {
                    return Err(Refused::Issuer);
                }
                for (path, want) in required {
                    let ok = match claim(&claims, path) {
                        Some(Value::String(s)) => s == want,
                        Some(Value::Array(items)) => {
                            items.iter().any(|i| i.as_str() == Some(want.as_str()))
                        }
                        Some(Value::Bool(b)) => b.to_string() == *want,
                        Some(Value::Number(n)) => n.to_string() == *want,
                        _ => false,
                    };
                    if !ok {
                        return Err(Refused::Claims);
                    }
                }
                return Ok(claims);
            }
            Err(e) => {
                last = match e.kind() {
                    ErrorKind::InvalidSignature => Refused::Signature,
                    ErrorKind::ExpiredSignature => return Err(Refused::Expired),
                    ErrorKind::ImmatureSignature => return Err(Refused::NotYetValid),
                    ErrorKind::InvalidIssuer => return Err(Refused::Issuer),
                    ErrorKind::InvalidAudience => return Err(Refused::Audience),
                    ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
                        "iss" => return Err(Refused::Issuer),
                        "aud" => return Err(Refused::Audience),
                        _ => return Err(Refused::Expired),
                    },
                    ErrorKind::InvalidAlgorithm => Refused::Algorithm,
                    _ => Refused::Malformed,
                };
                // A signature failure may be another key's token (a key
                // rotation); the other errors are the token's own, but
                // only after the signature held — decode checks it first.
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use serde_json::json;
    use std::time::Duration;

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn ed_key() -> (EncodingKey, Value) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": b64(pair.public_key().as_ref())});
        (EncodingKey::from_ed_der(pkcs8.as_ref()), jwk)
    }

    fn provider() -> Provider {
        Provider {
            name: "idp".into(),
            issuer: Some("https://idp.example".into()),
            audiences: vec!["shop".into()],
            keys: meshwork_core::jwt_provider::Keys::File("/unused".into()),
            locations: Vec::new(),
            forward_payload: None,
            clock_skew: Duration::from_secs(30),
            claim_headers: Vec::new(),
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    #[test]
    fn tokens_pass_or_fail_for_the_right_reason() {
        let (signing, jwk) = ed_key();
        let keys = KeySet::parse(json!({"keys": [jwk]}).to_string().as_bytes()).expect("keys");
        let p = provider();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let sign = |claims: Value| jsonwebtoken::encode(&header, &claims, &signing).expect("sign");
        let good = json!({"iss": "https://idp.example", "aud": "shop", "sub": "ann", "role": ["a", "admin"], "exp": now() + 60});
        let claims = verify(&sign(good.clone()), &p, &keys, &[]).expect("valid");
        assert_eq!(claims["sub"], "ann");
        let admin = [(vec!["role".to_owned()], "admin".to_owned())];
        assert!(verify(&sign(good.clone()), &p, &keys, &admin).is_ok());
        let root = [(vec!["role".to_owned()], "root".to_owned())];
        assert_eq!(
            verify(&sign(good.clone()), &p, &keys, &root),
            Err(Refused::Claims)
        );
        let with = |k: &str, v: Value| {
            let mut c = good.clone();
            c[k] = v;
            sign(c)
        };
        assert_eq!(
            verify(&with("exp", json!(now() - 120)), &p, &keys, &[]),
            Err(Refused::Expired)
        );
        assert!(
            verify(&with("exp", json!(now() - 10)), &p, &keys, &[]).is_ok(),
            "within the clock skew"
        );
        assert_eq!(
            verify(&with("nbf", json!(now() + 120)), &p, &keys, &[]),
            Err(Refused::NotYetValid)
        );
        assert_eq!(
            verify(&with("iss", json!("https://evil")), &p, &keys, &[]),
            Err(Refused::Issuer)
        );
        assert_eq!(
            verify(&with("aud", json!("other")), &p, &keys, &[]),
            Err(Refused::Audience)
        );
        assert_eq!(
            verify(
                &with("iss", json!(["https://other", "https://idp.example"])),
                &p,
                &keys,
                &[]
            ),
            Err(Refused::Issuer),
            "an issuer list"
        );
        let mut no_aud = good.clone();
        no_aud.as_object_mut().map(|o| o.remove("aud"));
        assert_eq!(
            verify(&sign(no_aud), &p, &keys, &[]),
            Err(Refused::Audience)
        );
        let mut no_exp = good.clone();
        no_exp.as_object_mut().map(|o| o.remove("exp"));
        assert_eq!(verify(&sign(no_exp), &p, &keys, &[]), Err(Refused::Expired));
        // Another key's signature.
        let (other, _) = ed_key();
        let forged = jsonwebtoken::encode(&header, &good, &other).expect("sign");
        assert_eq!(verify(&forged, &p, &keys, &[]), Err(Refused::Signature));
        // alg none, HS256 with the public key as the secret, garbage.
        let body = b64(good.to_string().as_bytes());
        let none = format!("{}.{body}.", b64(br#"{"alg":"none","kid":"k1"}"#));
        assert_eq!(verify(&none, &p, &keys, &[]), Err(Refused::Algorithm));
        let hs = format!("{}.{body}.c2ln", b64(br#"{"alg":"HS256","kid":"k1"}"#));
        assert_eq!(verify(&hs, &p, &keys, &[]), Err(Refused::Algorithm));
        assert_eq!(verify("a.b", &p, &keys, &[]), Err(Refused::Malformed));
        assert_eq!(verify("@@.@@.@@", &p, &keys, &[]), Err(Refused::Malformed));
        let huge = format!("{}.{}.x", "a".repeat(MAX_TOKEN_BYTES), body);
        assert_eq!(verify(&huge, &p, &keys, &[]), Err(Refused::TooLarge));
        // A kid the set does not have.
        let mut h2 = Header::new(Algorithm::EdDSA);
        h2.kid = Some("k9".into());
        let t = jsonwebtoken::encode(&h2, &good, &signing).expect("sign");
        assert_eq!(verify(&t, &p, &keys, &[]), Err(Refused::NoKey));
        // An ES256 token against an Ed25519 set: no key of its family.
        let es = format!("{}.{body}.c2ln", b64(br#"{"alg":"ES256"}"#));
        assert_eq!(verify(&es, &p, &keys, &[]), Err(Refused::NoKey));
    }

    #[test]
    fn key_sets_without_a_usable_key_are_refused() {
        for set in [
            json!({"keys": []}),
            json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),
            json!({"nokeys": 1}),
        ] {
            assert!(KeySet::parse(set.to_string().as_bytes()).is_err(), "{set}");
        }
        // Keys the gateway cannot use beside one it can: that one is kept.
        let (_, jwk) = ed_key();
        let set = json!({"keys": [
            {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"},
            {"kty": "AKP", "alg": "ML-DSA-44", "pub": "AA"},
            {"kty": "RSA", "alg": "RSA-OAEP-384", "n": "AA", "e": "AQAB"},
            jwk]});
        assert_eq!(
            KeySet::parse(set.to_string().as_bytes()).map(|k| k.keys()),
            Ok(1)
        );
    }
}
