//! Feeds arbitrary bytes to the DNS query path: it must answer (or drop)
//! without panicking, and every answer must itself be a valid DNS message.
//! Through the answer cache too: asked twice, the second (a kept answer,
//! patched) must say what the first said.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use hickory_proto::op::Message;
use hickory_proto::rr::Name;
use libfuzzer_sys::fuzz_target;
use meshwork_registry::dns::answer::{DnsConfig, Outcome, Transport, handle_packet};
use meshwork_registry::dns::cache::{AnswerCache, DEFAULT_BUDGET};
use meshwork_registry::state::State;
use meshwork_registry::state::catalog::{CheckSpec, HealthStatus, Registration, ServiceSpec};
use rand::SeedableRng;

fn fixture() -> &'static (State, DnsConfig) {
    static FIXTURE: OnceLock<(State, DnsConfig)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut state = State::default();
        for i in 0..12u8 {
            let id = format!("web-{i}");
            let registration = Registration {
                node: format!("host{i}"),
                address: format!("198.18.0.{i}"),
                datacenter: "dc1".into(),
                service: Some(ServiceSpec {
                    id: id.clone(),
                    name: "web".into(),
                    port: 8000 + u16::from(i),
                    tags: vec![format!("t{}", i % 3)],
                    ..ServiceSpec::default()
                }),
                checks: vec![CheckSpec {
                    check_id: format!("c{i}"),
                    status: if i % 4 == 0 { HealthStatus::Critical } else { HealthStatus::Passing },
                    service_id: id,
                    ..CheckSpec::default()
                }],
                ..Registration::default()
            };
            let _ = state.catalog.register(u64::from(i) + 1, &registration);
        }
        let config = DnsConfig {
            domain: Name::from_ascii("mesh.").expect("static name"),
            datacenter: "dc1".into(),
            service_ttl: HashMap::new(),
            node_ttl: 0,
            only_passing: false,
            a_record_limit: 0,
            recursors: Vec::new(),
            ns_addr: None,
            acl: None,
        };
        (state, config)
    })
}

fuzz_target!(|data: &[u8]| {
    let (state, config) = fixture();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Outcome::Reply(bytes) = handle_packet(data, state, config, transport, &mut rng) {
            if transport == Transport::Udp {
                assert!(bytes.len() <= 4096, "UDP answer of {} bytes", bytes.len());
            }
            if bytes.len() > 12 {
                assert!(Message::from_vec(&bytes).is_ok(), "invalid answer to {data:?}");
            }
        }
        let cache = AnswerCache::new(DEFAULT_BUDGET);
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let a = cache.answer(data, state, config, transport, &mut first);
        let b = cache.answer(data, state, config, transport, &mut second);
        match (a, b) {
            (Outcome::Placed, Outcome::Placed) => {
                assert_eq!(first.len() >= 4, second.len() >= 4);
                if first.len() >= 4 {
                    // Same id and flags and rcode, same counts.
                    assert_eq!(first[..4], second[..4], "{data:?}");
                }
                if let (Ok(x), Ok(y)) = (Message::from_vec(&first), Message::from_vec(&second)) {
                    assert_eq!(x.queries(), y.queries(), "{data:?}");
                    assert_eq!(x.answers().len(), y.answers().len(), "{data:?}");
                }
            }
            (Outcome::Drop, Outcome::Drop) | (Outcome::Forward, Outcome::Forward) => {}
            (a, b) => panic!("{data:?}: {a:?} then {b:?}"),
        }
    }
});
