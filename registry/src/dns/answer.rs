//! DNS answers from the catalog: a pure function from a query packet and
//! the state to a response packet. No sockets, no clocks; the shuffle takes
//! the caller's random source, so tests can fix it.
//!
//! Names (domain `mesh.` by default, an optional datacenter label before
//! it): `<service>.service`, `<tag>.<service>.service`,
//! `_<service>._<tag|tcp>.service` (RFC 2782), `<node>.node`,
//! `<hex-ipv4>.addr` (SRV targets of instances with their own address), the
//! domain apex (SOA, NS) and `ns.<domain>`; `in-addr.arpa` PTR for nodes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

use crate::auth::{Kind, Need, Resolved};
use crate::state::State;
use crate::state::catalog::{HealthStatus, Node, ServiceInstance};

/// Largest UDP answer without EDNS (RFC 1035).
pub const UDP_DEFAULT_SIZE: usize = 512;
/// Largest UDP answer we send even when a client offers more.
pub const UDP_MAX_SIZE: u16 = 4096;

/// DNS settings.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Lower-case, fully qualified (`mesh.`).
    pub domain: Name,
    pub datacenter: String,
    /// TTL of service answers by service name; `"*"` is the default.
    pub service_ttl: HashMap<String, u32>,
    pub node_ttl: u32,
    /// Leave out instances whose health is `warning`.
    pub only_passing: bool,
    /// At most this many A/AAAA records per answer (0: no limit).
    pub a_record_limit: usize,
    /// Upstream resolvers for names outside the domain.
    pub recursors: Vec<SocketAddr>,
    /// The address `ns.<domain>` resolves to.
    pub ns_addr: Option<IpAddr>,
    /// ACLs: answers show only what the DNS token may read (`None`:
    /// everything).
    pub acl: Option<std::sync::Arc<crate::auth::Acl>>,
}

impl DnsConfig {
    /// What DNS answers may show now: the DNS token's rights (nothing if
    /// that token does not resolve).
    fn authz(&self, state: &State) -> Resolved {
        match &self.acl {
            Some(acl) if acl.enabled() => {
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                acl.resolve_dns(&state.acl, now_ns).unwrap_or_else(|refusal| {
                    // Once a minute at most: this is per query.
                    static LAST_WARNED_S: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(0);
                    let now_s = now_ns / 1_000_000_000;
                    let last = LAST_WARNED_S.load(std::sync::atomic::Ordering::Relaxed);
                    if now_s >= last + 60
                        && LAST_WARNED_S
                            .compare_exchange(
                                last,
                                now_s,
                                std::sync::atomic::Ordering::Relaxed,
                                std::sync::atomic::Ordering::Relaxed,
                            )
                            .is_ok()
                    {
                        tracing::warn!(%refusal, "the DNS token (acl.tokens.dns) does not resolve; DNS answers nothing");
                    }
                    Resolved::nothing()
                })
            }
            _ => Resolved::everything(),
        }
    }

    fn service_ttl(&self, service: &str) -> u32 {
        self.service_ttl
            .get(service)
            .or_else(|| self.service_ttl.get("*"))
            .copied()
            .unwrap_or(0)
    }
}

/// The size a UDP answer may take for a client's EDNS0 size: 512, 1232
/// (the DNS flag day's safe size, for clients offering 1232 to 4095) or
/// 4096 — a few sizes, so that answers cut to size can be kept.
pub fn udp_limit(edns_size: u16) -> u16 {
    match edns_size {
        UDP_MAX_SIZE.. => UDP_MAX_SIZE,
        1232.. => 1232,
        _ => 512,
    }
}

/// The transport a query came over (it sets the size limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a packet.
#[derive(Debug)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send the bytes now in the caller's buffer back (the answer cache's
    /// way: no allocation).
    Placed,
    /// A name outside our domain: ask a recursor (the packet as received).
    Forward,
    /// Not worth an answer (shorter than a header, or itself a response).
    Drop,
}

/// How the instances of a service answer are ordered.
pub enum Order<'a> {
    /// Shuffled.
    Random(&'a mut dyn rand::RngCore),
    /// Sorted by node and service id, then rotated left this many places:
    /// the answer cache's variants, in which every instance comes first
    /// once.
    Rotated(usize),
}

/// What an answer was made from, so that a kept copy can tell whether it
/// is still the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Covers {
    /// The configuration alone (the apex, `ns`, `.addr` names, refusals).
    Config,
    /// The instances of this service (as registered, under the name
    /// asked) and which service names exist; `instances` were in it.
    Service { name: String, instances: usize },
    /// The nodes (node names, reverse lookups).
    Nodes,
    /// Not to be kept: forwarded, dropped, an error, or a service found
    /// under another case of its name.
    Nothing,
}

/// Answers one DNS packet.
pub fn handle_packet(
    packet: &[u8],
    state: &State,
    config: &DnsConfig,
    transport: Transport,
    rng: &mut impl rand::Rng,
) -> Outcome {
    answer(packet, state, config, transport, Order::Random(rng)).0
}

/// Answers one DNS packet, ordering service answers by `order`, and says
/// what the answer covers.
pub fn answer(
    packet: &[u8],
    state: &State,
    config: &DnsConfig,
    transport: Transport,
    order: Order<'_>,
) -> (Outcome, Covers) {
    let mut covers = Covers::Config;
    let outcome = answer_inner(packet, state, config, transport, order, &mut covers);
    match outcome {
        Outcome::Reply(_) => (outcome, covers),
        _ => (outcome, Covers::Nothing),
    }
}

fn answer_inner(
    packet: &[u8],
    state: &State,
    config: &DnsConfig,
    transport: Transport,
    order: Order<'_>,
    covers: &mut Covers,
) -> Outcome {
    if packet.len() < 12 {
        return Outcome::Drop;
    }
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => {
            *covers = Covers::Nothing;
            return Outcome::Reply(header_only_error(packet, ResponseCode::FormErr));
        }
    };
    if request.message_type() == MessageType::Response {
        return Outcome::Drop;
    }
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(!config.recursors.is_empty());
    for q in request.queries() {
        response.add_query(q.clone());
    }
    if request.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_MAX_SIZE);
        response.set_edns(edns);
    }
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => request.extensions().as_ref().map_or(UDP_DEFAULT_SIZE, |e| {
            usize::from(udp_limit(e.max_payload()))
        }),
    };
    if request.op_code() != OpCode::Query {
        response.set_response_code(ResponseCode::NotImp);
        return Outcome::Reply(encode(response, limit));
    }
    let authz = config.authz(state);
    let [query] = request.queries() else {
        response.set_response_code(ResponseCode::FormErr);
        return Outcome::Reply(encode(response, limit));
    };
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        response.set_response_code(ResponseCode::Refused);
        return Outcome::Reply(encode(response, limit));
    }
    let name = query.name().to_lowercase();
    let reverse = Name::from_ascii("in-addr.arpa.")
        .map(|n| n.zone_of(&name))
        .unwrap_or(false);
    if reverse {
        *covers = Covers::Nodes;
        return match reverse_lookup(&name, state, config, &authz) {
            Some(record) => {
                response.set_authoritative(true);
                response.add_answer(record);
                Outcome::Reply(encode(response, limit))
            }
            None if !config.recursors.is_empty() => Outcome::Forward,
            None => {
                response.set_authoritative(true);
                response.set_response_code(ResponseCode::NXDomain);
                response.add_name_server(soa_record(config));
                Outcome::Reply(encode(response, limit))
            }
        };
    }
    if !config.domain.zone_of(&name) {
        if !config.recursors.is_empty() {
            return Outcome::Forward;
        }
        response.set_response_code(ResponseCode::Refused);
        return Outcome::Reply(encode(response, limit));
    }
    response.set_authoritative(true);
    let found = lookup(query, &name, (state, &authz), config, order, covers);
    match found {
        Lookup::NxDomain => {
            response.set_response_code(ResponseCode::NXDomain);
            response.add_name_server(soa_record(config));
        }
        Lookup::Records {
            answers,
            additionals,
        } if answers.is_empty() => {
            response.add_name_server(soa_record(config));
            response.add_additionals(additionals);
        }
        Lookup::Records {
            answers,
            additionals,
        } => {
            response.add_answers(answers);
            response.add_additionals(additionals);
        }
    }
    Outcome::Reply(encode(response, limit))
}

enum Lookup {
    NxDomain,
    /// Empty answers mean NODATA (the name exists, not with that type).
    Records {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
}

impl Lookup {
    fn nodata() -> Self {
        Lookup::Records {
            answers: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// The labels of `name` below the domain, left to right, lower-case, with
/// a trailing datacenter label removed.
fn relative_labels(name: &Name, config: &DnsConfig) -> Vec<String> {
    let keep =
        usize::from(name.num_labels()).saturating_sub(usize::from(config.domain.num_labels()));
    let mut labels: Vec<String> = name
        .iter()
        .take(keep)
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    if labels.len() >= 2
        && labels
            .last()
            .is_some_and(|l| *l == config.datacenter.to_ascii_lowercase())
    {
        let kind = &labels[labels.len() - 2];
        if kind == "service" || kind == "node" || kind == "addr" {
            labels.pop();
        }
    }
    labels
}

fn lookup(
    query: &Query,
    name: &Name,
    (state, authz): (&State, &Resolved),
    config: &DnsConfig,
    order: Order<'_>,
    covers: &mut Covers,
) -> Lookup {
    let qtype = query.query_type();
    let labels = relative_labels(name, config);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    match labels.as_slice() {
        [] => match qtype {
            RecordType::SOA => Lookup::Records {
                answers: vec![soa_record(config)],
                additionals: Vec::new(),
            },
            RecordType::NS | RecordType::ANY => Lookup::Records {
                answers: vec![Record::from_rdata(
                    config.domain.clone(),
                    config.node_ttl,
                    RData::NS(NS(ns_name(config))),
                )],
                additionals: ns_addr_record(config).into_iter().collect(),
            },
            _ => Lookup::nodata(),
        },
        ["ns"] => match (qtype, ns_addr_record(config)) {
            (RecordType::A | RecordType::AAAA | RecordType::ANY, Some(record))
                if type_matches(qtype, &record) =>
            {
                Lookup::Records {
                    answers: vec![record],
                    additionals: Vec::new(),
                }
            }
            _ => Lookup::nodata(),
        },
        [node, "node"] => {
            *covers = Covers::Nodes;
            node_lookup(node, qtype, name, state, config, authz)
        }
        // Any hex number is a name here: not kept (a flood of them would
        // fill the answer cache).
        [hex, "addr"] => match decode_hex_ipv4(hex).inspect(|_| *covers = Covers::Nothing) {
            Some(ip) if matches!(qtype, RecordType::A | RecordType::ANY) => Lookup::Records {
                answers: vec![Record::from_rdata(
                    name.clone(),
                    config.node_ttl,
                    RData::A(A(ip)),
                )],
                additionals: Vec::new(),
            },
            Some(_) => Lookup::nodata(),
            None => Lookup::NxDomain,
        },
        [service, "service"] if !service.starts_with('_') => service_lookup(
            service,
            None,
            qtype,
            name,
            (state, authz),
            config,
            (order, covers),
        ),
        [tag, service, "service"] if tag.starts_with('_') && service.starts_with('_') => {
            // RFC 2782: `_<service>._<tag|tcp>`; the first label is the service.
            let (svc, proto) = (&tag[1..], &service[1..]);
            let tag = (proto != "tcp" && proto != "udp").then_some(proto);
            service_lookup(
                svc,
                tag,
                qtype,
                name,
                (state, authz),
                config,
                (order, covers),
            )
        }
        [tag, service, "service"] => service_lookup(
            service,
            Some(tag),
            qtype,
            name,
            (state, authz),
            config,
            (order, covers),
        ),
        _ => Lookup::NxDomain,
    }
}

fn type_matches(qtype: RecordType, record: &Record) -> bool {
    qtype == RecordType::ANY || record.record_type() == qtype
}

fn node_by_name<'a>(state: &'a State, name: &str) -> Option<&'a Node> {
    state.catalog.node(name).or_else(|| {
        state
            .catalog
            .nodes()
            .find(|n| n.name.eq_ignore_ascii_case(name))
    })
}

fn node_lookup(
    node: &str,
    qtype: RecordType,
    name: &Name,
    state: &State,
    config: &DnsConfig,
    authz: &Resolved,
) -> Lookup {
    // A node the DNS token may not read does not exist for DNS.
    let Some(node) =
        node_by_name(state, node).filter(|n| authz.allows(Kind::Node, &n.name, Need::Read))
    else {
        return Lookup::NxDomain;
    };
    let answers: Vec<Record> = address_record(name.clone(), &node.address, config.node_ttl)
        .into_iter()
        .filter(|r| type_matches(qtype, r))
        .collect();
    Lookup::Records {
        answers,
        additionals: Vec::new(),
    }
}

fn address_record(name: Name, address: &str, ttl: u32) -> Option<Record> {
    match address.parse::<IpAddr>().ok()? {
        IpAddr::V4(ip) => Some(Record::from_rdata(name, ttl, RData::A(A(ip)))),
        IpAddr::V6(ip) => Some(Record::from_rdata(name, ttl, RData::AAAA(AAAA(ip)))),
    }
}

fn service_lookup(
    service: &str,
    tag: Option<&str>,
    qtype: RecordType,
    name: &Name,
    // The state and what the DNS token may read of it.
    (state, authz): (&State, &Resolved),
    config: &DnsConfig,
    (order, covers): (Order<'_>, &mut Covers),
) -> Lookup {
    let catalog = &state.catalog;
    let reads_all = authz.reads_all(Kind::Service) && authz.reads_all(Kind::Node);
    let mut candidates: Vec<(&Node, &ServiceInstance)> = catalog.instances(service).collect();
    *covers = Covers::Service {
        name: service.to_owned(),
        instances: candidates.len(),
    };
    if candidates.is_empty() {
        // Service names are case-insensitive in DNS; registered names may not be.
        candidates = catalog
            .service_names()
            .into_keys()
            .filter(|n| n.eq_ignore_ascii_case(service))
            .flat_map(|n| catalog.instances(n).collect::<Vec<_>>())
            .collect();
        if !candidates.is_empty() {
            // Found under another case of its name: the answer hangs on
            // services other than `service`'s own, so it is not kept.
            *covers = Covers::Nothing;
        }
    }
    let mut instances: Vec<(&Node, &ServiceInstance, HealthStatus)> = candidates
        .into_iter()
        .filter(|(_, s)| tag.is_none_or(|t| s.tags.iter().any(|have| have.eq_ignore_ascii_case(t))))
        // One check per answer when the DNS token reads everything (the
        // usual case), one per instance otherwise.
        .filter(|(n, s)| {
            reads_all
                || (authz.allows(Kind::Service, &s.name, Need::Read)
                    && authz.allows(Kind::Node, &n.name, Need::Read))
        })
        .map(|(n, s)| (n, s, catalog.instance_status(&n.name, &s.id)))
        .filter(|(_, _, status)| match status {
            HealthStatus::Passing => true,
            HealthStatus::Warning => !config.only_passing,
            HealthStatus::Critical => false,
        })
        .collect();
    if instances.is_empty() {
        return Lookup::NxDomain;
    }
    if let Covers::Service { instances: n, .. } = covers {
        *n = instances.len();
    }
    match order {
        Order::Random(rng) => instances.shuffle(rng),
        Order::Rotated(by) => {
            instances
                .sort_by(|(n1, s1, _), (n2, s2, _)| (&n1.name, &s1.id).cmp(&(&n2.name, &s2.id)));
            let len = instances.len();
            instances.rotate_left(by % len);
        }
    }
    let ttl = config.service_ttl(service);
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    match qtype {
        RecordType::A | RecordType::AAAA | RecordType::ANY => {
            let mut seen = std::collections::HashSet::new();
            for (node, svc, _) in &instances {
                let address = if svc.address.is_empty() {
                    &node.address
                } else {
                    &svc.address
                };
                if let Some(record) = address_record(name.clone(), address, ttl)
                    && type_matches(qtype, &record)
                    && seen.insert(address.clone())
                {
                    answers.push(record);
                }
            }
            if config.a_record_limit > 0 {
                answers.truncate(config.a_record_limit);
            }
        }
        RecordType::SRV => {
            for (node, svc, status) in &instances {
                let weight = match status {
                    HealthStatus::Warning => svc.weights.warning,
                    _ => svc.weights.passing,
                };
                let own_ipv4 = (!svc.address.is_empty() && svc.address != node.address)
                    .then(|| svc.address.parse::<Ipv4Addr>().ok())
                    .flatten();
                let (target, target_addr) = match own_ipv4 {
                    Some(ip) => (
                        labels_name(&[&hex_ipv4(ip), "addr", &config.datacenter], &config.domain),
                        svc.address.as_str(),
                    ),
                    None => (
                        labels_name(&[&node.name, "node", &config.datacenter], &config.domain),
                        node.address.as_str(),
                    ),
                };
                let Some(target) = target else { continue };
                answers.push(Record::from_rdata(
                    name.clone(),
                    ttl,
                    RData::SRV(SRV::new(
                        1,
                        u16::try_from(weight).unwrap_or(u16::MAX),
                        svc.port,
                        target.clone(),
                    )),
                ));
                if let Some(record) = address_record(target, target_addr, ttl) {
                    additionals.push(record);
                }
            }
        }
        _ => {}
    }
    Lookup::Records {
        answers,
        additionals,
    }
}

fn labels_name(labels: &[&str], domain: &Name) -> Option<Name> {
    let mut text = labels.join(".");
    text.push('.');
    text.push_str(&domain.to_ascii());
    Name::from_ascii(text.trim_end_matches('.').to_owned() + ".").ok()
}

fn hex_ipv4(ip: Ipv4Addr) -> String {
    ip.octets().iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex_ipv4(hex: &str) -> Option<Ipv4Addr> {
    if hex.len() != 8 {
        return None;
    }
    let n = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(n))
}

fn reverse_lookup(
    name: &Name,
    state: &State,
    config: &DnsConfig,
    authz: &Resolved,
) -> Option<Record> {
    // d.c.b.a.in-addr.arpa. → a.b.c.d
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    if labels.len() != 6 {
        return None;
    }
    let ip: Ipv4Addr = format!("{}.{}.{}.{}", labels[3], labels[2], labels[1], labels[0])
        .parse()
        .ok()?;
    let node = state
        .catalog
        .nodes()
        .find(|n| n.address.parse::<Ipv4Addr>().ok() == Some(ip))
        .filter(|n| authz.allows(Kind::Node, &n.name, Need::Read))?;
    let target = labels_name(&[&node.name, "node", &config.datacenter], &config.domain)?;
    Some(Record::from_rdata(
        name.clone(),
        config.node_ttl,
        RData::PTR(PTR(target)),
    ))
}

fn ns_name(config: &DnsConfig) -> Name {
    labels_name(&["ns"], &config.domain).unwrap_or_else(|| config.domain.clone())
}

fn ns_addr_record(config: &DnsConfig) -> Option<Record> {
    let ip = config.ns_addr?;
    address_record(ns_name(config), &ip.to_string(), config.node_ttl)
}

fn soa_record(config: &DnsConfig) -> Record {
    let rname =
        labels_name(&["hostmaster"], &config.domain).unwrap_or_else(|| config.domain.clone());
    // Negative answers may be cached for the node TTL (0 by default).
    let soa = SOA::new(ns_name(config), rname, 1, 3600, 600, 86400, config.node_ttl);
    Record::from_rdata(config.domain.clone(), config.node_ttl, RData::SOA(soa))
}

/// Encodes a response within `limit` bytes: additional records go first
/// (without TC), then answers are cut and TC is set.
fn encode(mut response: Message, limit: usize) -> Vec<u8> {
    let fits = |m: &Message| m.to_vec().ok().filter(|bytes| bytes.len() <= limit);
    if let Some(bytes) = fits(&response) {
        return bytes;
    }
    // Dropping additional records alone does not call for TC (RFC 2181
    // §9): the answer is complete, the client can look the targets up.
    response.take_additionals();
    if let Some(bytes) = fits(&response) {
        return bytes;
    }
    response.set_truncated(true);
    let mut answers = response.take_answers();
    while !answers.is_empty() {
        let mut attempt = response.clone();
        attempt.insert_answers(answers.clone());
        if let Some(bytes) = fits(&attempt) {
            return bytes;
        }
        answers.truncate(answers.len() / 2);
    }
    response.take_name_servers();
    fits(&response).unwrap_or_else(|| header_only_error(&[0, 0], ResponseCode::ServFail))
}

/// A bare header answering a packet that could not be parsed.
fn header_only_error(packet: &[u8], code: ResponseCode) -> Vec<u8> {
    let id = [
        packet.first().copied().unwrap_or(0),
        packet.get(1).copied().unwrap_or(0),
    ];
    let opcode_bits = packet.get(2).copied().unwrap_or(0) & 0x78;
    let rd = packet.get(2).copied().unwrap_or(0) & 0x01;
    let mut out = vec![0u8; 12];
    out[0] = id[0];
    out[1] = id[1];
    out[2] = 0x80 | opcode_bits | rd;
    out[3] = u16::from(code) as u8 & 0x0f;
    out
}

/// The settings the DNS tests use: domain `mesh.`, datacenter `dc1`,
/// TTLs 0, no recursors, no ACLs.
#[cfg(test)]
pub(crate) fn test_config() -> DnsConfig {
    DnsConfig {
        domain: Name::from_ascii("mesh.").expect("name"),
        datacenter: "dc1".into(),
        service_ttl: HashMap::new(),
        node_ttl: 0,
        only_passing: false,
        a_record_limit: 0,
        recursors: Vec::new(),
        ns_addr: Some("127.0.0.1".parse().expect("ip")),
        acl: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::catalog::{CheckSpec, Registration, ServiceSpec};
    use rand::SeedableRng;

    fn config() -> DnsConfig {
        test_config()
    }

    fn state_with(instances: &[(&str, &str, &str, HealthStatus, &[&str])]) -> State {
        let mut state = State::default();
        for (i, (node, addr, svc_addr, status, tags)) in instances.iter().enumerate() {
            let id = format!("web-{i}");
            state
                .catalog
                .register(
                    i as u64 + 1,
                    &Registration {
                        node: (*node).into(),
                        address: (*addr).into(),
                        datacenter: "dc1".into(),
                        service: Some(ServiceSpec {
                            id: id.clone(),
                            name: "web".into(),
                            address: (*svc_addr).into(),
                            port: 8080,
                            tags: tags.iter().map(|t| t.to_string()).collect(),
                            ..ServiceSpec::default()
                        }),
                        checks: vec![CheckSpec {
                            check_id: format!("c{i}"),
                            status: *status,
                            service_id: id,
                            ..CheckSpec::default()
                        }],
                        ..Registration::default()
                    },
                )
                .expect("register");
        }
        state
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7)
            .add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        m.to_vec().expect("encode")
    }

    fn ask(state: &State, name: &str, qtype: RecordType) -> Message {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        match handle_packet(
            &query(name, qtype),
            state,
            &config(),
            Transport::Udp,
            &mut rng,
        ) {
            Outcome::Reply(bytes) => Message::from_vec(&bytes).expect("valid response"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn service_a_records_exclude_critical_instances() {
        let state = state_with(&[
            ("n1", "10.0.0.1", "", HealthStatus::Passing, &["v1"]),
            ("n2", "10.0.0.2", "", HealthStatus::Warning, &["v2"]),
            ("n3", "10.0.0.3", "", HealthStatus::Critical, &["v1"]),
        ]);
        let r = ask(&state, "web.service.mesh.", RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.authoritative());
        let mut ips: Vec<String> = r.answers().iter().map(|a| a.data().to_string()).collect();
        ips.sort();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
        let tagged = ask(&state, "v1.web.service.dc1.mesh.", RecordType::A);
        assert_eq!(tagged.answers().len(), 1);
        let upper = ask(&state, "WEB.Service.MESH.", RecordType::A);
        assert_eq!(upper.answers().len(), 2);
    }

    #[test]
    fn srv_with_additional_records_and_rfc2782() {
        let state = state_with(&[
            ("n1", "10.0.0.1", "", HealthStatus::Passing, &["v1"]),
            ("n2", "10.0.0.2", "10.9.9.9", HealthStatus::Passing, &[]),
        ]);
        for name in ["web.service.mesh.", "_web._tcp.service.mesh."] {
            let r = ask(&state, name, RecordType::SRV);
            assert_eq!(r.answers().len(), 2, "{name}");
            assert_eq!(r.additionals().len(), 2, "{name}");
            let targets: Vec<String> = r.answers().iter().map(|a| a.data().to_string()).collect();
            assert!(
                targets.iter().any(|t| t.contains("n1.node.dc1.mesh.")),
                "{targets:?}"
            );
            assert!(
                targets
                    .iter()
                    .any(|t| t.contains("0a090909.addr.dc1.mesh.")),
                "{targets:?}"
            );
        }
        let r = ask(&state, "_web._v1.service.mesh.", RecordType::SRV);
        assert_eq!(r.answers().len(), 1);
        let addr = ask(&state, "0a090909.addr.dc1.mesh.", RecordType::A);
        assert_eq!(addr.answers()[0].data().to_string(), "10.9.9.9");
    }

    #[test]
    fn nxdomain_versus_nodata() {
        let state = state_with(&[("n1", "10.0.0.1", "", HealthStatus::Passing, &[])]);
        let r = ask(&state, "nope.service.mesh.", RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        assert_eq!(r.name_servers()[0].record_type(), RecordType::SOA);
        let r = ask(&state, "web.service.mesh.", RecordType::AAAA);
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());
        assert_eq!(r.name_servers()[0].record_type(), RecordType::SOA);
        let r = ask(&state, "web.service.mesh.", RecordType::MX);
        assert_eq!(
            (r.response_code(), r.answers().len()),
            (ResponseCode::NoError, 0)
        );
        let r = ask(&state, "n1.node.mesh.", RecordType::A);
        assert_eq!(r.answers()[0].data().to_string(), "10.0.0.1");
        let r = ask(&state, "ghost.node.mesh.", RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        let r = ask(&state, "mesh.", RecordType::SOA);
        assert_eq!(r.answers()[0].record_type(), RecordType::SOA);
        let r = ask(&state, "mesh.", RecordType::NS);
        assert_eq!(r.answers()[0].record_type(), RecordType::NS);
        let r = ask(&state, "1.0.0.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(r.answers()[0].data().to_string(), "n1.node.dc1.mesh.");
        let r = ask(&state, "example.com.", RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::Refused);
        let r = ask(&state, "a.b.c.weird.mesh.", RecordType::A);
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn udp_answers_are_truncated_to_512_bytes() {
        let many: Vec<(String, String)> = (0..60)
            .map(|i| (format!("n{i}"), format!("10.0.{}.{}", i / 200, i % 200 + 1)))
            .collect();
        let entries: Vec<(&str, &str, &str, HealthStatus, &[&str])> = many
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_str(), "", HealthStatus::Passing, &[][..]))
            .collect();
        let state = state_with(&entries);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let Outcome::Reply(bytes) = handle_packet(
            &query("web.service.mesh.", RecordType::SRV),
            &state,
            &config(),
            Transport::Udp,
            &mut rng,
        ) else {
            panic!("no reply");
        };
        assert!(bytes.len() <= 512);
        let r = Message::from_vec(&bytes).expect("valid");
        assert!(r.truncated());
        assert!(!r.answers().is_empty());
        let Outcome::Reply(bytes) = handle_packet(
            &query("web.service.mesh.", RecordType::SRV),
            &state,
            &config(),
            Transport::Tcp,
            &mut rng,
        ) else {
            panic!("no reply");
        };
        let r = Message::from_vec(&bytes).expect("valid");
        assert!(!r.truncated());
        assert_eq!(r.answers().len(), 60);
    }

    #[test]
    fn only_passing_and_a_record_limit() {
        let state = state_with(&[
            ("n1", "10.0.0.1", "", HealthStatus::Passing, &[]),
            ("n2", "10.0.0.2", "", HealthStatus::Warning, &[]),
            ("n3", "10.0.0.3", "", HealthStatus::Passing, &[]),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut cfg = config();
        cfg.only_passing = true;
        let Outcome::Reply(bytes) = handle_packet(
            &query("web.service.mesh.", RecordType::A),
            &state,
            &cfg,
            Transport::Udp,
            &mut rng,
        ) else {
            panic!("no reply");
        };
        let r = Message::from_vec(&bytes).expect("valid");
        assert!(
            r.answers()
                .iter()
                .all(|a| a.data().to_string() != "10.0.0.2")
        );
        assert_eq!(r.answers().len(), 2);
        cfg.only_passing = false;
        cfg.a_record_limit = 1;
        cfg.service_ttl.insert("web".into(), 9);
        let Outcome::Reply(bytes) = handle_packet(
            &query("web.service.mesh.", RecordType::A),
            &state,
            &cfg,
            Transport::Udp,
            &mut rng,
        ) else {
            panic!("no reply");
        };
        let r = Message::from_vec(&bytes).expect("valid");
        assert_eq!(r.answers().len(), 1);
        assert_eq!(r.answers()[0].ttl(), 9);
    }

    #[test]
    fn dropping_only_additionals_does_not_set_tc() {
        let many: Vec<(String, String)> = (0..10)
            .map(|i| (format!("host-number-{i}"), format!("10.0.0.{}", i + 1)))
            .collect();
        let entries: Vec<(&str, &str, &str, HealthStatus, &[&str])> = many
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_str(), "", HealthStatus::Passing, &[][..]))
            .collect();
        let state = state_with(&entries);
        let r = ask(&state, "web.service.mesh.", RecordType::SRV);
        assert_eq!(r.answers().len(), 10);
        assert!(r.additionals().is_empty());
        assert!(!r.truncated());
    }

    #[test]
    fn bad_packets_get_formerr_notimp_or_nothing() {
        let state = State::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!(matches!(
            handle_packet(&[1, 2, 3], &state, &config(), Transport::Udp, &mut rng),
            Outcome::Drop
        ));
        let mut garbage = query("web.service.mesh.", RecordType::A);
        garbage.truncate(garbage.len() - 3);
        let Outcome::Reply(bytes) =
            handle_packet(&garbage, &state, &config(), Transport::Udp, &mut rng)
        else {
            panic!("no reply");
        };
        assert_eq!(bytes[0..2], [0, 7]);
        assert_eq!(bytes[3] & 0x0f, 1, "FORMERR");
        // Two questions.
        let mut m = Message::new();
        m.set_id(9);
        m.add_query(Query::query(
            Name::from_ascii("a.mesh.").expect("n"),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_ascii("b.mesh.").expect("n"),
            RecordType::A,
        ));
        let Outcome::Reply(bytes) = handle_packet(
            &m.to_vec().expect("enc"),
            &state,
            &config(),
            Transport::Udp,
            &mut rng,
        ) else {
            panic!("no reply");
        };
        assert_eq!(
            Message::from_vec(&bytes).expect("valid").response_code(),
            ResponseCode::FormErr
        );
        // A non-query opcode.
        let mut m = Message::new();
        m.set_id(3).set_op_code(OpCode::Status);
        let Outcome::Reply(bytes) = handle_packet(
            &m.to_vec().expect("enc"),
            &state,
            &config(),
            Transport::Udp,
            &mut rng,
        ) else {
            panic!("no reply");
        };
        assert_eq!(
            Message::from_vec(&bytes).expect("valid").response_code(),
            ResponseCode::NotImp
        );
        // Random bytes never panic.
        let mut rng2 = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..20_000 {
            let len = rand::Rng::random_range(&mut rng2, 0..300);
            let bytes: Vec<u8> = (0..len).map(|_| rand::Rng::random(&mut rng2)).collect();
            let _ = handle_packet(&bytes, &state, &config(), Transport::Udp, &mut rng);
        }
    }
}
