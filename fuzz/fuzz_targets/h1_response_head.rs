//! Feeds arbitrary bytes to the sidecar's HTTP/1.1 response-head parser
//! (what an upstream sends back): it must parse, ask for more, or refuse
//! with a reason — never panic — and a parsed head consumes no more than
//! it was given and states a framing consistent with itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshwork_sidecar::upstream::h1::parse::{Asked, Framing, parse_head};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let asked = Asked {
        head: flags & 1 == 1,
        upgrade: flags & 2 == 2,
        connect: flags & 4 == 4,
    };
    let mut buf = BytesMut::from(text);
    if let Ok(Some((head, framing, reusable))) = parse_head(&mut buf, asked) {
        assert!(buf.len() < text.len(), "a head consumed nothing");
        let switched = head.status.as_u16() == 101;
        assert!(
            !head.status.is_informational() || (switched && asked.upgrade),
            "an interim head was returned"
        );
        let tunnel = switched || (asked.connect && head.status.is_success());
        assert_eq!(framing == Framing::Tunnel, tunnel, "tunnel framing");
        assert!(!tunnel || !reusable, "a tunnel's connection reused");
        if asked.head && !tunnel {
            assert_eq!(framing, Framing::Done, "a body after HEAD");
        }
        // A 101 keeps its Connection and Upgrade fields for the client.
        let hop = if switched {
            &["transfer-encoding", "keep-alive"][..]
        } else {
            &["connection", "transfer-encoding", "keep-alive"][..]
        };
        for name in hop {
            assert!(!head.headers.contains_key(*name), "hop-by-hop {name} kept");
        }
    }
});
