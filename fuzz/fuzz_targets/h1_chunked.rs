//! Feeds arbitrary bytes, in arbitrary pieces, to the sidecar's chunked
//! decoder: it must decode, ask for more, or refuse — never panic or loop
//! — and it never yields more data than it was given, whatever the
//! split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshwork_sidecar::upstream::h1::parse::{Chunk, Step, chunk_step};

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    // Bytes arrive `piece` at a time, as reads from a socket would.
    let piece = usize::from(split).max(1);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut out = 0;
    let mut state = Chunk::Size;
    // Every step consumes input, or asks for more (then input is fed),
    // so the steps are bounded by twice the input plus the pieces.
    for _ in 0..(4 * body.len() + 16) {
        match chunk_step(&mut buf, state) {
            Ok(Step::Next(next)) => state = next,
            Ok(Step::Data(bytes, next)) => {
                assert!(!bytes.is_empty(), "an empty data step");
                out += bytes.len();
                state = next;
            }
            Ok(Step::End(_)) | Err(_) => break,
            Ok(Step::More) => {
                if fed == body.len() {
                    break;
                }
                let end = (fed + piece).min(body.len());
                buf.extend_from_slice(&body[fed..end]);
                fed = end;
            }
        }
        assert!(out <= fed, "{out} bytes of data out of {fed} in");
    }
});
