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
/// Removes an `Upgrade: h2c` offer (and its `HTTP2-Settings`): the
/// request stays the HTTP/1.1 request it also is.
pub fn drop_h2c_upgrade(headers: &mut HeaderMap) {
    // Byte by byte: a value that is not UTF-8 must not hide the token.
    let h2c = headers.get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    });
    if h2c {
        headers.remove(header::UPGRADE);
        headers.remove("http2-settings");
    }
}

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

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

// Which hop-by-hop headers a message has, as bits.
const HAS_CONNECTION: u8 = 1;
const HAS_TE: u8 = 2;
const HAS_TRANSFER_ENCODING: u8 = 4;
const HAS_UPGRADE: u8 = 8;
const HAS_KEEP_ALIVE: u8 = 16;
const HAS_PROXY_CONNECTION: u8 = 32;

/// Hop-by-hop whatever `Connection` says (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_bit(name) != 0
}

/// The bit of a header that is hop-by-hop whatever `Connection` says.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        HAS_CONNECTION
    } else if name == header::TE {
        HAS_TE
    } else if name == header::TRANSFER_ENCODING {
        HAS_TRANSFER_ENCODING
    } else if name == header::UPGRADE {
        HAS_UPGRADE
    } else if name == KEEP_ALIVE {
        HAS_KEEP_ALIVE
    } else if name == PROXY_CONNECTION {
        HAS_PROXY_CONNECTION
    } else {
        0
    }
}

/// Drops hop-by-hop headers (RFC 9110 §7.6.1), and those the
/// `Connection` header names; keeps `te: trailers` (gRPC needs it) and,
/// for an upgrade, `Connection: upgrade` and `Upgrade`.
///
/// It runs on every request and response, so it looks first (one pass
/// over the names, standard ones comparing as enums) and then touches
/// only the headers that are there.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let present = headers.keys().fold(0, |bits, n| bits | hop_by_hop_bit(n));
    if present == 0 && !upgrade {
        return;
    }
    if present & HAS_CONNECTION != 0 {
        // Usually just `keep-alive` or `close`: no allocation for those
        // unless a header of that name is there to go.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("keep-alive") {
                    continue; // removed below with the fixed ones
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                    && !(upgrade && name == header::UPGRADE)
                    && headers.contains_key(&name)
                {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if present & HAS_KEEP_ALIVE != 0 {
        headers.remove(KEEP_ALIVE);
    }
    if present & HAS_PROXY_CONNECTION != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    if present & HAS_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & HAS_TE != 0 {
        let trailers = headers
            .get_all(header::TE)
            .iter()
            .any(|v| has_token(v, "trailers"));
        headers.remove(header::TE);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HAS_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// The host a request is for, lower case, without a port: HTTP/2's
/// `:authority` (or an absolute-form target's), else `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> String {
    let host = req
        .uri()
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| match h.rsplit_once(':') {
                    Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                    _ => h,
                })
        })
        .unwrap_or("");
    host.trim_end_matches('.').to_ascii_lowercase()
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
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert!(!plain.contains_key("keep-alive"));
        assert!(!plain.contains_key("proxy-connection"));
        assert!(!plain.contains_key(header::TRANSFER_ENCODING));
        assert!(!plain.contains_key("x-secret"));
        assert!(!plain.contains_key(header::CONNECTION));
        assert!(!plain.contains_key(header::UPGRADE));
        assert_eq!(plain[header::TE], "trailers");
        assert!(plain.contains_key("traceparent"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        // Untouched without any hop-by-hop header; `close` names no header.
        let mut end = HeaderMap::new();
        end.insert(header::CONNECTION, HeaderValue::from_static("close"));
        end.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut end, false);
        assert_eq!(end.len(), 1);
        strip_hop_by_hop(&mut end, false);
        assert_eq!(end.len(), 1);
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
