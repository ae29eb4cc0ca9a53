use std::collections::HashMap;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use rand::SeedableRng;

use super::*;
use crate::state::catalog::{CheckSpec, HealthStatus, Registration, ServiceSpec};

fn config() -> DnsConfig {
    answer::test_config()
}

fn register(state: &mut State, index: u64, service: &str, i: usize, status: HealthStatus) {
    let id = format!("{service}-{i}");
    state
        .catalog
        .register(
            index,
            &Registration {
                node: format!("n{i}"),
                address: format!("10.0.{}.{}", i / 250, i % 250 + 1),
                datacenter: "dc1".into(),
                service: Some(ServiceSpec {
                    id: id.clone(),
                    name: service.into(),
                    port: 8000 + u16::try_from(i).expect("small"),
                    ..ServiceSpec::default()
                }),
                checks: vec![CheckSpec {
                    check_id: format!("c-{id}"),
                    status,
                    service_id: id,
                    ..CheckSpec::default()
                }],
                ..Registration::default()
            },
        )
        .expect("register");
}

fn state_with(service: &str, n: usize) -> State {
    let mut state = State::default();
    for i in 0..n {
        register(&mut state, i as u64 + 1, service, i, HealthStatus::Passing);
    }
    state
}

fn query(name: &str, qtype: RecordType, id: u16, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(id.is_multiple_of(2))
        .add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

fn via_cache(cache: &AnswerCache, state: &State, packet: &[u8], transport: Transport) -> Message {
    let mut out = Vec::new();
    match cache.answer(packet, state, &config(), transport, &mut out) {
        Outcome::Placed => Message::from_vec(&out).expect("a valid answer"),
        other => panic!("unexpected {other:?}"),
    }
}

fn full_path(state: &State, packet: &[u8], transport: Transport) -> Message {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    match answer::handle_packet(packet, state, &config(), transport, &mut rng) {
        Outcome::Reply(bytes) => Message::from_vec(&bytes).expect("a valid answer"),
        other => panic!("unexpected {other:?}"),
    }
}

/// The records of a section as sorted text (order aside).
fn sorted(records: &[hickory_proto::rr::Record]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| r.to_string().to_ascii_lowercase())
        .collect();
    v.sort();
    v
}

fn same_answer(got: &Message, want: &Message, what: &str) {
    assert_eq!(got.id(), want.id(), "{what}: id");
    assert_eq!(
        got.recursion_desired(),
        want.recursion_desired(),
        "{what}: RD"
    );
    assert_eq!(got.response_code(), want.response_code(), "{what}: rcode");
    assert_eq!(got.truncated(), want.truncated(), "{what}: TC");
    assert_eq!(got.authoritative(), want.authoritative(), "{what}: AA");
    assert_eq!(
        got.queries(),
        want.queries(),
        "{what}: question (its case too)"
    );
    assert_eq!(
        got.extensions().is_some(),
        want.extensions().is_some(),
        "{what}: EDNS"
    );
    if want.truncated() {
        assert_eq!(got.answers().len(), want.answers().len(), "{what}: answers");
    } else {
        assert_eq!(
            sorted(got.answers()),
            sorted(want.answers()),
            "{what}: answers"
        );
        assert_eq!(
            sorted(got.additionals()),
            sorted(want.additionals()),
            "{what}: additionals"
        );
    }
    assert_eq!(
        sorted(got.name_servers()),
        sorted(want.name_servers()),
        "{what}: authority"
    );
}

#[test]
fn a_kept_answer_is_the_answer_with_the_querys_id_flags_and_case() {
    let state = state_with("web", 5);
    let cache = AnswerCache::new(DEFAULT_BUDGET);
    // (name, type, kept): only NOERROR answers with records are kept.
    let cases: &[(&str, RecordType, bool)] = &[
        ("web.service.mesh.", RecordType::A, true),
        ("WeB.SeRvIcE.mesh.", RecordType::A, true),
        ("web.service.mesh.", RecordType::SRV, true),
        ("_web._tcp.service.mesh.", RecordType::SRV, true),
        ("web.service.dc1.mesh.", RecordType::AAAA, false),
        ("web.service.mesh.", RecordType::ANY, true),
        ("nope.service.mesh.", RecordType::A, false),
        ("n1.node.mesh.", RecordType::A, true),
        ("N2.NODE.mesh.", RecordType::A, true),
        ("mesh.", RecordType::SOA, true),
        ("mesh.", RecordType::NS, true),
        ("ns.mesh.", RecordType::A, true),
        ("0a000001.addr.mesh.", RecordType::A, false),
        ("1.0.0.10.in-addr.arpa.", RecordType::PTR, true),
        ("example.com.", RecordType::A, false),
        ("what.ever.mesh.", RecordType::TXT, false),
    ];
    for (i, (name, qtype, kept)) in cases.iter().enumerate() {
        for edns in [None, Some(512), Some(1232), Some(2000), Some(4096)] {
            for transport in [Transport::Udp, Transport::Tcp] {
                let what = format!("{name} {qtype} {edns:?} {transport:?}");
                // The first asks with one id and case; the next (a hit)
                // with others.
                let first = query(name, *qtype, 100 + i as u16, edns);
                let _ = via_cache(&cache, &state, &first, transport);
                let again = query(&name.to_ascii_uppercase(), *qtype, 201 + i as u16, edns);
                let (hits, _) = cache.stats();
                let got = via_cache(&cache, &state, &again, transport);
                assert_eq!(cache.stats().0, hits + u64::from(*kept), "{what}: kept?");
                same_answer(&got, &full_path(&state, &again, transport), &what);
            }
        }
    }
}

#[test]
fn a_change_to_what_an_answer_covers_shows_in_the_next_one() {
    let mut state = state_with("web", 3);
    register(&mut state, 10, "db", 7, HealthStatus::Passing);
    let cache = AnswerCache::new(DEFAULT_BUDGET);
    let ask = |cache: &AnswerCache, state: &State, name: &str| {
        let m = via_cache(
            cache,
            state,
            &query(name, RecordType::A, 1, None),
            Transport::Udp,
        );
        (m.response_code(), m.answers().len())
    };
    assert_eq!(
        ask(&cache, &state, "web.service.mesh."),
        (ResponseCode::NoError, 3)
    );
    assert_eq!(
        ask(&cache, &state, "new.service.mesh."),
        (ResponseCode::NXDomain, 0)
    );
    assert_eq!(
        ask(&cache, &state, "n7.node.mesh."),
        (ResponseCode::NoError, 1)
    );
    assert_eq!(
        ask(&cache, &state, "db.service.mesh."),
        (ResponseCode::NoError, 1)
    );
    let (hits, misses) = cache.stats();
    // Another service changes: web's answer is still kept.
    register(&mut state, 11, "db", 8, HealthStatus::Passing);
    assert_eq!(
        ask(&cache, &state, "web.service.mesh."),
        (ResponseCode::NoError, 3)
    );
    assert_eq!(cache.stats(), (hits + 1, misses));
    // An instance of web turns critical, one is added: the next answers
    // show it.
    register(&mut state, 12, "web", 1, HealthStatus::Critical);
    assert_eq!(
        ask(&cache, &state, "web.service.mesh."),
        (ResponseCode::NoError, 2)
    );
    register(&mut state, 13, "web", 4, HealthStatus::Passing);
    assert_eq!(
        ask(&cache, &state, "web.service.mesh."),
        (ResponseCode::NoError, 3)
    );
    // A name that did not exist does once registered, in any case.
    register(&mut state, 14, "New", 5, HealthStatus::Passing);
    assert_eq!(
        ask(&cache, &state, "new.service.mesh."),
        (ResponseCode::NoError, 1)
    );
    // ... and is not kept (it hangs on another name's instances).
    let (_, misses) = cache.stats();
    assert_eq!(
        ask(&cache, &state, "new.service.mesh."),
        (ResponseCode::NoError, 1)
    );
    assert_eq!(cache.stats().1, misses + 1);
    // A node's address changes.
    state
        .catalog
        .register(
            15,
            &Registration {
                node: "n7".into(),
                address: "10.9.9.9".into(),
                datacenter: "dc1".into(),
                ..Registration::default()
            },
        )
        .expect("node");
    let m = via_cache(
        &cache,
        &state,
        &query("n7.node.mesh.", RecordType::A, 1, None),
        Transport::Udp,
    );
    assert_eq!(m.answers()[0].data().to_string(), "10.9.9.9");
    // ... and so does the answer of the service on it.
    let m = via_cache(
        &cache,
        &state,
        &query("db.service.mesh.", RecordType::A, 1, None),
        Transport::Udp,
    );
    let addresses: Vec<String> = m.answers().iter().map(|r| r.data().to_string()).collect();
    assert!(addresses.contains(&"10.9.9.9".to_owned()), "{addresses:?}");
}

#[test]
fn every_instance_comes_first_equally_often() {
    let state = state_with("web", 10);
    let cache = AnswerCache::new(DEFAULT_BUDGET);
    let mut first: HashMap<String, usize> = HashMap::new();
    for i in 0..1000u16 {
        let m = via_cache(
            &cache,
            &state,
            &query("web.service.mesh.", RecordType::A, i, None),
            Transport::Udp,
        );
        assert_eq!(m.answers().len(), 10);
        *first.entry(m.answers()[0].data().to_string()).or_default() += 1;
    }
    assert_eq!(first.len(), 10, "{first:?}");
    assert!(first.values().all(|n| *n == 100), "{first:?}");
    assert_eq!(cache.stats(), (999, 1));
}

#[test]
fn memory_stays_within_the_budget_and_unusual_queries_take_the_full_path() {
    let mut state = State::default();
    for s in 0..20u64 {
        for i in 0..3u64 {
            let service = format!("s{s}");
            register(
                &mut state,
                1 + s * 3 + i,
                &service,
                (100 * s + i) as usize,
                HealthStatus::Passing,
            );
        }
    }
    let budget = 6 * 1024;
    let cache = AnswerCache::new(budget);
    let mut id = 0u16;
    for round in 0..3 {
        for s in 0..20 {
            for qtype in [RecordType::A, RecordType::SRV, RecordType::ANY] {
                for edns in [None, Some(1232), Some(4096)] {
                    id = id.wrapping_add(1);
                    let name = format!("s{s}.service.mesh.");
                    let m = via_cache(
                        &cache,
                        &state,
                        &query(&name, qtype, id, edns),
                        Transport::Udp,
                    );
                    assert_eq!(m.answers().len(), 3, "round {round} {name} {qtype}");
                    assert!(cache.bytes() <= budget, "{} bytes", cache.bytes());
                }
            }
        }
    }
    assert!(cache.bytes() > 0);
    // Negative answers are not kept: a flood of random names leaves the
    // cache as it was.
    let before = cache.bytes();
    for i in 0..500u16 {
        let name = format!("x{i}.service.mesh.");
        let _ = via_cache(
            &cache,
            &state,
            &query(&name, RecordType::A, i, None),
            Transport::Udp,
        );
    }
    assert_eq!(cache.bytes(), before);
    let state = state_with("web", 3);
    let cache = AnswerCache::new(DEFAULT_BUDGET);
    let plain = query("web.service.mesh.", RecordType::A, 9, None);
    // Two questions; a compression pointer in the question; EDNS version
    // 1; bytes after the question; a response.
    let mut two = Message::new();
    two.set_id(1)
        .add_query(Query::query(
            Name::from_ascii("web.service.mesh.").expect("n"),
            RecordType::A,
        ))
        .add_query(Query::query(
            Name::from_ascii("web.service.mesh.").expect("n"),
            RecordType::SRV,
        ));
    let mut pointer = plain[..12].to_vec();
    pointer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let mut version1 = query("web.service.mesh.", RecordType::A, 9, Some(1232));
    let opt_version = version1.len() - 11 + 6;
    version1[opt_version] = 1;
    let mut trailing = plain.clone();
    trailing.push(0);
    let mut response = plain.clone();
    response[2] |= 0x80;
    for packet in [
        two.to_vec().expect("encode"),
        pointer,
        version1,
        trailing,
        response,
    ] {
        let mut out = Vec::new();
        let outcome = cache.answer(&packet, &state, &config(), Transport::Udp, &mut out);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        match (
            outcome,
            answer::handle_packet(&packet, &state, &config(), Transport::Udp, &mut rng),
        ) {
            (Outcome::Placed, Outcome::Reply(want)) => {
                let (got, want) = (Message::from_vec(&out), Message::from_vec(&want));
                match (got, want) {
                    (Ok(got), Ok(want)) => assert_eq!(got.response_code(), want.response_code()),
                    (got, want) => assert_eq!(got.is_ok(), want.is_ok()),
                }
            }
            (Outcome::Drop, Outcome::Drop) => {}
            (got, want) => panic!("{packet:?}: {got:?} vs {want:?}"),
        }
        assert_eq!(cache.bytes(), 0, "{packet:?} was kept");
    }
}
