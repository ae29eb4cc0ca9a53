//! Encoded answers, kept until what they cover changes. A query is looked
//! up by its question (name in lower case, type, class) and the size its
//! answer may take (transport, EDNS); a hit copies the kept bytes into the
//! caller's buffer, patches the ID, the RD bit and the question's letter
//! case (answers point at the question's name, so they echo it too) and is
//! sent as it is: no parsing with hickory, no allocation.
//!
//! An entry says what it was made from ([`Covers`]): a service's own
//! index and the service list's, the nodes' index, or the configuration
//! alone (and, with ACLs on, the ACL tables' index, for at most a second:
//! tokens expire by the clock). It is used only while those are unchanged,
//! so a change shows in the very next answer, as without the cache.
//!
//! A service answer is kept as one variant per instance (up to
//! [`MAX_VARIANTS`]): the instances sorted, then rotated, so each comes
//! first in one variant; the answer that makes them takes one at random
//! and the hits after it take the others in turn, so every instance is
//! first equally often (what a random shuffle gives on average). Only
//! NOERROR answers with records are kept: negative answers are cheap and
//! their names are the client's to choose (a flood of random names would
//! only churn the cache). Memory is bounded by bytes: past the budget,
//! the least recently used half is dropped.
//!
//! Only plain queries are kept: opcode QUERY, one question without name
//! compression, nothing but an EDNS OPT record (version 0) after it.
//! Everything else takes the full path every time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::answer::{self, Covers, DnsConfig, Order, Outcome, Transport, UDP_DEFAULT_SIZE};
use crate::state::State;

/// Variants kept per answer: a service with more instances is not kept
/// (its answers would not stay fair).
pub const MAX_VARIANTS: usize = 64;
/// Bytes of answers kept (keys and variants).
pub const DEFAULT_BUDGET: usize = 16 << 20;
/// With ACLs on, an entry lives at most this long (a token may expire).
const ACL_MAX_AGE: Duration = Duration::from_secs(1);
/// Longest key: a 255-byte name, type, class, size, EDNS flag.
const MAX_KEY: usize = 255 + 4 + 3;

/// What an entry was made from, as indexes to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Validity {
    Config,
    Service { name: String, index: u64 },
    Nodes(u64),
}

impl Validity {
    fn of(covers: &Covers, state: &State) -> Option<Self> {
        match covers {
            Covers::Config => Some(Validity::Config),
            Covers::Service { name, instances } if *instances <= MAX_VARIANTS => {
                Some(Validity::Service {
                    name: name.clone(),
                    index: state.catalog.service_index(name),
                })
            }
            Covers::Nodes => Some(Validity::Nodes(state.catalog.nodes_index())),
            Covers::Service { .. } | Covers::Nothing => None,
        }
    }

    fn holds(&self, state: &State) -> bool {
        match self {
            Validity::Config => true,
            Validity::Service { name, index } => *index == state.catalog.service_index(name),
            Validity::Nodes(index) => *index == state.catalog.nodes_index(),
        }
    }
}

struct Entry {
    variants: Vec<Box<[u8]>>,
    validity: Validity,
    /// The ACL tables' index and when it was made, with ACLs on.
    acl: Option<(u64, Instant)>,
    /// The next variant to send.
    turn: AtomicUsize,
    /// The cache's clock when last used (for eviction).
    used: AtomicU64,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Box<[u8]>, Entry>,
    bytes: usize,
}

/// The answers of one server, shared by its UDP workers and TCP
/// connections.
pub struct AnswerCache {
    inner: RwLock<Inner>,
    budget: usize,
    clock: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// A query as the cache reads it.
struct Parsed {
    key: [u8; MAX_KEY],
    key_len: usize,
    /// The question's name on the wire (offset 12), as sent.
    name_len: usize,
}

/// Reads the parts of a query an answer depends on; `None` for anything
/// but a plain query (which then takes the full path).
fn parse(packet: &[u8], transport: Transport) -> Option<Parsed> {
    let header = packet.get(..12)?;
    // QR = 0, opcode QUERY; one question, no answers or authority, at
    // most one additional record (EDNS).
    if header[2] & 0xf8 != 0
        || header[4..6] != [0, 1]
        || header[6..10] != [0, 0, 0, 0]
        || header[10] != 0
        || header[11] > 1
    {
        return None;
    }
    let mut key = [0u8; MAX_KEY];
    let mut at = 12;
    loop {
        let len = usize::from(*packet.get(at)?);
        if len & 0xc0 != 0 {
            return None;
        }
        let label = packet.get(at..at + 1 + len)?;
        if at - 12 + label.len() > 255 {
            return None;
        }
        for (i, b) in label.iter().enumerate() {
            key[at - 12 + i] = if i == 0 { *b } else { b.to_ascii_lowercase() };
        }
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let name_len = at - 12;
    let type_class = packet.get(at..at + 4)?;
    key[name_len..name_len + 4].copy_from_slice(type_class);
    at += 4;
    let (edns, size) = if header[11] == 1 {
        // The OPT record: root name, type 41, class = UDP size, TTL =
        // extended rcode, version, flags; then its data, to the end.
        let opt = packet.get(at..at + 11)?;
        if opt[0] != 0 || opt[1..3] != [0, 41] || opt[6] != 0 {
            return None;
        }
        let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
        if packet.len() != at + 11 + rdlen {
            return None;
        }
        (true, u16::from_be_bytes([opt[3], opt[4]]))
    } else {
        if packet.len() != at {
            return None;
        }
        (false, 0)
    };
    let limit: u16 = match (transport, edns) {
        (Transport::Tcp, _) => u16::MAX,
        (Transport::Udp, false) => UDP_DEFAULT_SIZE as u16,
        (Transport::Udp, true) => answer::udp_limit(size),
    };
    let tail = name_len + 4;
    key[tail..tail + 2].copy_from_slice(&limit.to_be_bytes());
    key[tail + 2] = u8::from(edns);
    Some(Parsed {
        key,
        key_len: tail + 3,
        name_len,
    })
}

/// Copies a kept answer for `packet` into `out`: its ID, RD bit and the
/// question's letters.
fn patch(kept: &[u8], packet: &[u8], name_len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(kept);
    out[0] = packet[0];
    out[1] = packet[1];
    out[2] = (out[2] & !0x01) | (packet[2] & 0x01);
    out[12..12 + name_len].copy_from_slice(&packet[12..12 + name_len]);
}

/// Whether `reply` is worth keeping and can be patched for other queries
/// of the same key: a NOERROR answer with records (negative answers are
/// cheap to make and their names are the client's choice: a flood of
/// random names would only churn the cache) that echoes the one question
/// at offset 12.
fn keepable(reply: &[u8], packet: &[u8], name_len: usize) -> bool {
    reply.len() >= 12 + name_len
        && reply[3] & 0x0f == 0
        && reply[4..6] == [0, 1]
        && reply[6..8] != [0, 0]
        && reply[12..12 + name_len].eq_ignore_ascii_case(&packet[12..12 + name_len])
}

/// How many answer records `reply` has.
fn answer_count(reply: &[u8]) -> usize {
    reply
        .get(6..8)
        .map_or(0, |c| usize::from(u16::from_be_bytes([c[0], c[1]])))
}

impl AnswerCache {
    /// A cache of at most `budget` bytes (0: keeps nothing).
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: RwLock::new(Inner::default()),
            budget,
            clock: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Answers `packet` into `out` (a kept answer, or a new one that is
    /// then kept); the outcome says what to do when it is not a reply.
    pub fn answer(
        &self,
        packet: &[u8],
        state: &State,
        config: &DnsConfig,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let parsed = if self.budget == 0 {
            None
        } else {
            parse(packet, transport)
        };
        let Some(parsed) = parsed else {
            let mut rng = rand::rng();
            return match answer::handle_packet(packet, state, config, transport, &mut rng) {
                Outcome::Reply(bytes) => {
                    *out = bytes;
                    Outcome::Placed
                }
                other => other,
            };
        };
        let key = &parsed.key[..parsed.key_len];
        let acl_index = config
            .acl
            .as_ref()
            .filter(|acl| acl.enabled())
            .map(|_| state.acl.index());
        if self.hit(key, packet, parsed.name_len, (state, acl_index), out) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            crate::metrics::METRICS.dns_cache(true);
            return Outcome::Placed;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS.dns_cache(false);
        let (first, covers) = answer::answer(packet, state, config, transport, Order::Rotated(0));
        let Outcome::Reply(first) = first else {
            return first;
        };
        let mut rng = rand::rng();
        let validity =
            Validity::of(&covers, state).filter(|_| keepable(&first, packet, parsed.name_len));
        let Some(validity) = validity else {
            // Not kept: answered as without a cache (shuffled, when the
            // order matters).
            if answer_count(&first) < 2 {
                *out = first;
                return Outcome::Placed;
            }
            return match answer::handle_packet(packet, state, config, transport, &mut rng) {
                Outcome::Reply(bytes) => {
                    *out = bytes;
                    Outcome::Placed
                }
                other => other,
            };
        };
        // One variant per instance when the order matters (several
        // records); each is an answer made in full.
        let count = match &covers {
            Covers::Service { instances, .. } if answer_count(&first) > 1 => (*instances).max(1),
            _ => 1,
        };
        let mut variants = vec![first.into_boxed_slice()];
        for by in 1..count {
            match answer::answer(packet, state, config, transport, Order::Rotated(by)).0 {
                Outcome::Reply(bytes) => variants.push(bytes.into_boxed_slice()),
                _ => break,
            }
        }
        // This answer takes a variant at random (so that answers made anew
        // after every change do not all lead with one instance); the hits
        // after it take the ones that follow.
        let pick = rand::Rng::random_range(&mut rng, 0..variants.len());
        out.clear();
        out.extend_from_slice(&variants[pick]);
        self.insert(key, variants, validity, (acl_index, pick + 1));
        Outcome::Placed
    }

    fn hit(
        &self,
        key: &[u8],
        packet: &[u8],
        name_len: usize,
        (state, acl_index): (&State, Option<u64>),
        out: &mut Vec<u8>,
    ) -> bool {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = inner.entries.get(key) else {
            return false;
        };
        let acl_fresh = match (acl_index, entry.acl) {
            (None, None) => true,
            (Some(now), Some((made, at))) => now == made && at.elapsed() < ACL_MAX_AGE,
            _ => false,
        };
        if !acl_fresh || !entry.validity.holds(state) {
            return false;
        }
        entry.used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let turn = entry.turn.fetch_add(1, Ordering::Relaxed);
        let Some(kept) = entry.variants.get(turn % entry.variants.len().max(1)) else {
            return false;
        };
        patch(kept, packet, name_len, out);
        true
    }

    /// Keeps `variants` under `key`; `next` is the variant the next hit
    /// takes.
    fn insert(
        &self,
        key: &[u8],
        variants: Vec<Box<[u8]>>,
        validity: Validity,
        (acl_index, next): (Option<u64>, usize),
    ) {
        let bytes = key.len() + variants.iter().map(|v| v.len()).sum::<usize>() + 64;
        if bytes > self.budget / 8 {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.entries.remove(key) {
            inner.bytes -= old.bytes;
        }
        if inner.bytes + bytes > self.budget {
            evict(&mut inner, self.budget / 2);
        }
        inner.bytes += bytes;
        inner.entries.insert(
            key.into(),
            Entry {
                variants,
                validity,
                acl: acl_index.map(|i| (i, Instant::now())),
                turn: AtomicUsize::new(next),
                used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
                bytes,
            },
        );
        crate::metrics::METRICS.dns_cache_bytes(inner.bytes);
    }

    /// Answers sent from the cache, and made anew, since it was made.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

/// Drops the least recently used entries until at most `target` bytes
/// are kept (one pass to find the cut, one to drop).
fn evict(inner: &mut Inner, target: usize) {
    let mut ages: Vec<(u64, usize)> = inner
        .entries
        .values()
        .map(|e| (e.used.load(Ordering::Relaxed), e.bytes))
        .collect();
    ages.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
    let mut kept = 0usize;
    let mut cut = 0u64;
    for (used, bytes) in &ages {
        if kept + bytes > target {
            cut = *used;
            break;
        }
        kept += bytes;
    }
    inner
        .entries
        .retain(|_, e| e.used.load(Ordering::Relaxed) > cut);
    inner.bytes = inner.entries.values().map(|e| e.bytes).sum();
}

#[cfg(test)]
mod tests;
