//! Feeds arbitrary bytes to the DNS query path: it must answer (or drop)
//! without panicking, and every answer must itself be a valid DNS message.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use hickory_proto::op::Message;
use hickory_proto::rr::Name;
use libfuzzer_sys::fuzz_target;
use meshwork_registry::dns::answer::{DnsConfig, Outcome, Transport, handle_packet};
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
    }
});
