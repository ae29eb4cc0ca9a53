//! Feeds arbitrary bytes to the sidecar's HTTP/1.1 response-head parser
//! (what an upstream sends back): it must parse, ask for more, or refuse
//! with a reason — never panic — and a parsed head consumes no more than
//! it was given and states a framing consistent with itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshwork_sidecar::upstream::h1::parse::{Framing, parse_head};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let mut buf = BytesMut::from(text);
    if let Ok(Some((head, framing, _reusable))) = parse_head(&mut buf, head_request) {
        assert!(buf.len() < text.len(), "a head consumed nothing");
        assert!(!head.status.is_informational(), "an interim head was returned");
        if head_request {
            assert_eq!(framing, Framing::Done, "a body after HEAD");
        }
        for name in ["connection", "transfer-encoding", "keep-alive"] {
            assert!(!head.headers.contains_key(name), "hop-by-hop {name} kept");
        }
    }
});
