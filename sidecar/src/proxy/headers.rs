//! Header rules of the HTTP proxy: which headers are hop-by-hop and go
//! (RFC 9110 §7.6.1), what makes a request an upgrade or gRPC, the
//! declared body length. Pure functions over header maps.

use hyper::Request;
use hyper::Version;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An HTTP/1.1 `Connection: upgrade` request with an `Upgrade` header.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Drops hop-by-hop headers (RFC 9110 §7.6.1), and those the
/// `Connection` header names; keeps `te: trailers` (gRPC needs it) and,
/// for an upgrade, `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names (standard
    // ones compare as enums) instead of a hashed lookup per name.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(name);
    }
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| has_token(v, "trailers"));
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove(header::CONNECTION);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// A header that is hop-by-hop whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;

    #[test]
    fn hop_by_hop_headers_go_but_trailers_and_upgrades_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert!(!plain.contains_key("x-secret"));
        assert!(!plain.contains_key(header::CONNECTION));
        assert!(!plain.contains_key(header::UPGRADE));
        assert_eq!(plain[header::TE], "trailers");
        assert!(plain.contains_key("traceparent"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn methods_and_lengths() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&h), Some(12));
        let req = Request::builder()
            .method(Method::GET)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        assert!(is_upgrade(&req));
    }
}
