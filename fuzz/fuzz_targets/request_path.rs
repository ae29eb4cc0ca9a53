//! Feeds arbitrary request targets to what every inbound request meets on
//! a sidecar: the path's normalisation and the intentions' decision. It
//! must never panic; a normalised path must be stable (normalising it
//! again changes nothing), start with `/`, hold no `.`/`..` segment and no
//! empty segment; and the decision must depend only on that normal form.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshwork_core::http_path::{normalize, split_query};
use meshwork_core::intentions::{IntentionSet, Request};

fn intentions() -> &'static IntentionSet {
    static SET: OnceLock<IntentionSet> = OnceLock::new();
    SET.get_or_init(|| {
        let entry = serde_json::json!({"Sources": [{"Name": "web", "Permissions": [
            {"Action": "deny", "HTTP": {"PathRegex": "/admin(/.*)?"}},
            {"Action": "allow", "HTTP": {"PathPrefix": "/public/", "Methods": ["GET"]}},
            {"Action": "allow", "HTTP": {"PathExact": "/", "Header": [{"Name": "x-a", "Regex": "[a-z]+", "Invert": true}]}}
        ]}]});
        let serde_json::Value::Object(body) = entry else {
            unreachable!("a JSON object")
        };
        IntentionSet::compile("api", [("api", &body)], false).expect("a valid entry")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let (path, _query) = split_query(target);
    let Ok(normal) = normalize(path) else {
        return;
    };
    assert!(normal.starts_with('/'), "{target:?} -> {normal:?}");
    assert_eq!(normalize(&normal).ok().as_deref(), Some(&*normal), "stable: {target:?}");
    for segment in normal.split('/').skip(1) {
        assert!(segment != "." && segment != "..", "{target:?} -> {normal:?}");
    }
    assert!(!normal.contains("//"), "{target:?} -> {normal:?}");
    let mut headers = http::HeaderMap::new();
    headers.insert("x-a", http::HeaderValue::from_static("abc"));
    let decided = intentions().decide_request("web", &Request::new("GET", &normal, &headers));
    let again = intentions().decide_request("web", &Request::new("GET", &normal, &headers));
    assert_eq!(decided, again);
});
