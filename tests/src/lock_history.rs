//! The record of the fault suite's lock clients and its checks: a Consul
//! lock (`PUT /v1/kv/:key?acquire=` / `?release=` under sessions with a
//! TTL) never has two holders at once, judged only from what the clients
//! could know, and the lock's state read back (`Session`, `LockIndex`)
//! agrees with the acquisitions. Pure: it runs nothing and talks to no
//! server; `lock_client` records the history, `fault_report` turns the
//! verdict into a check.
//!
//! Times are nanoseconds since the run's start on the test process's
//! monotonic clock. The servers' TTL clocks run on the same host's
//! monotonic clock (`CLOCK_MONOTONIC` is one per kernel, network namespaces
//! included, and SIGSTOP does not stop it), so a client time and a server
//! time can be compared.
//!
//! # When may a client call itself the holder?
//!
//! From the *completion* of an acquire answered `true` (the write happened
//! somewhere inside the call; the client knows only when it returns) until
//! the earlier of
//!
//! - the *invocation* of its release (from then on the lock may be free),
//!   and
//! - the earliest moment the servers could have invalidated its session:
//!   Consul's contract for a TTL is a lower bound — a session is not
//!   expired before TTL has passed since the leader last saw it renewed
//!   (this registry waits twice the TTL, Consul's `SessionTTLMultiplier`,
//!   but a client may only count on the contract, so the check does too,
//!   and thereby demands no more than Consul promises). The leader records
//!   a renewal (or, for a new session, starts its clock) at some moment
//!   inside the call, so no earlier than the call's invocation: the
//!   session lives at least until `last successful renew's (or create's)
//!   invocation + TTL`. A renewal that failed or whose answer was lost may
//!   have reached the leader too; leaving it out only ends the interval
//!   earlier. A renewal answered 200 proves the session alive through
//!   that bound, and a session that is alive at a moment was alive at
//!   every moment since its creation, so the bound holds for every
//!   earlier instant as well.
//!
//! The sessions are created with no node checks and the `release`
//! behaviour, on servers' own nodes (never deregistered), and nobody
//! destroys a session before its holder's release: so only a release or a
//! TTL expiry ends a holding, and these *safe intervals* (half-open) of
//! two holdings must never overlap.
//!
//! Except for a release of the same session whose outcome stayed unknown:
//! it may still be applied at any later time (a server kept it while cut
//! off, and forwarded it after the heal), and then it ends whatever that
//! session holds by then — a later holding too. Such a holding is
//! *tainted*: the client could not count on it, so it is left out of the
//! checks (and counted apart). The lock clients give a session up after
//! an unknown release, so there are none unless a client errs; the first
//! fault runs found one before they did.
//!
//! # LockIndex
//!
//! The key is created by its first acquisition (LockIndex 1) and never
//! deleted; every acquisition by a session that does not hold the lock
//! adds one, a holder acquiring again adds nothing. A client attempts an
//! acquisition with one session, retrying after an unknown answer
//! (`Acquire { attempt }` numbers the attempt): an attempt that ended
//! `true` is exactly one acquisition (a retry after an unknown call that
//! took effect is the holder acquiring again; the session cannot have lost
//! the lock in between, since it would then be gone and no later call of
//! it could succeed), and an attempt with an unknown call and no `true` is
//! at most one — until later, since an unknown call may be applied any
//! time after it was made. So, with `T` the attempts that ended `true` and
//! `U` the acquire calls whose outcome is unknown: every LockIndex read is
//! at most `T + U`, and one read after every client stopped is at least
//! `T` (each attempt that ended `true` began a holding after the
//! session's previous one ended, so no two share an acquisition). Besides:
//! reads ordered in real time never see LockIndex or ModifyIndex go back;
//! one LockIndex is only ever seen with one session; two holdings never
//! show the same LockIndex; and a read that lies wholly inside a holding's
//! safe interval sees that holding's session — whoever reads.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// What a lock client called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockCall {
    /// `PUT /v1/session/create` with this TTL (the new session's ID is the
    /// operation's `session`, when it answered).
    Create { ttl_ns: u64 },
    /// `PUT /v1/session/renew/:id`.
    Renew,
    /// `PUT /v1/session/destroy/:id` (of a session given up on).
    Destroy,
    /// `PUT ?acquire=`, one call of the client's `attempt`-th attempt.
    Acquire { attempt: u32 },
    /// `PUT ?release=`.
    Release,
    /// `GET ?consistent` of the lock key.
    Read,
}

/// The lock key's state as a read saw it (absent: no session, index 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockState {
    pub session: Option<String>,
    pub lock_index: u64,
    pub modify_index: u64,
}

/// What came of a call, as far as the client can know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    /// `true` (acquire, release), 200 (create, renew, destroy).
    Ok,
    /// `false` (acquire, release) or 404 (renew): answered, no change.
    Refused,
    /// Surely no effect: never connected, a 4xx, or refused because the
    /// session is gone (`gone`: the client drops the session).
    Failed { gone: bool },
    /// May or may not have taken effect.
    Unknown,
    /// A read's answer.
    Seen(LockState),
}

/// One call of a lock client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOp {
    pub client: u32,
    /// The session the call used (for a create, the one it made; empty
    /// when none).
    pub session: String,
    pub call: LockCall,
    pub outcome: LockOutcome,
    pub invoke: u64,
    /// `None` when the outcome is unknown.
    pub complete: Option<u64>,
    /// The server it went to.
    pub via: String,
}

/// One acquisition a client knew it made, and how long it may count on
/// it (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub client: u32,
    pub session: String,
    /// Completion of the acquire answered `true`.
    pub from: u64,
    /// The invocation of the release that followed (`u64::MAX`: none).
    pub release_at: u64,
    /// The session lives at least until then.
    pub alive_until: u64,
    /// LockIndex the holder read while holding, if it did.
    pub lock_index: Option<u64>,
    /// A release (or destroy) of the same session made before, whose
    /// outcome is unknown, may end it at any moment: not counted on.
    pub tainted: bool,
}

impl Holding {
    /// The end of the safe interval `[from, to)`.
    pub fn to(&self) -> u64 {
        self.release_at.min(self.alive_until)
    }
}

/// The checks' findings: `violations` empty is a pass; the counts say how
/// much was checked.
#[derive(Debug, Default)]
pub struct LockVerdict {
    /// Holdings with a non-empty safe interval (not tainted).
    pub holdings: Vec<Holding>,
    /// Holdings left out: a release of theirs from before could still land.
    pub tainted: Vec<Holding>,
    /// Holdings whose safe interval the TTL bound cut short, or to nothing.
    pub cut_by_ttl: usize,
    pub cut_to_nothing: usize,
    /// Consecutive holdings (in time) by different clients.
    pub handoffs: usize,
    /// Reads that lay inside some holding's safe interval (each checked to
    /// show that holding's session).
    pub reads_inside_holdings: usize,
    pub reads: usize,
    /// Attempts that ended `true` (T), and acquire calls with an unknown
    /// outcome (U).
    pub acquired_attempts: usize,
    pub unknown_acquires: usize,
    /// The highest LockIndex the final reads saw.
    pub final_lock_index: Option<u64>,
    pub violations: Vec<String>,
}

impl LockVerdict {
    pub fn summary(&self) -> String {
        format!(
            "{} acquisitions checked for mutual exclusion ({} left out as tainted by an earlier unknown release; {} handoffs between clients; {} safe intervals cut short by the TTL bound, {} more to nothing); {} reads, {} of them inside a holding's safe interval; {} attempts acquired, {} acquire calls unknown; final LockIndex {:?}",
            self.holdings.len(),
            self.tainted.len(),
            self.handoffs,
            self.cut_by_ttl,
            self.cut_to_nothing,
            self.reads,
            self.reads_inside_holdings,
            self.acquired_attempts,
            self.unknown_acquires,
            self.final_lock_index
        )
    }
}

/// Checks `ops` (every lock client's calls on one key, in any order).
/// Reads invoked at or after `final_from` (once every client stopped) are
/// the final reads.
pub fn check_lock_history(ops: &[LockOp], final_from: u64) -> LockVerdict {
    let mut verdict = LockVerdict::default();
    let mut by_client: BTreeMap<u32, Vec<&LockOp>> = BTreeMap::new();
    for op in ops {
        by_client.entry(op.client).or_default().push(op);
    }
    for calls in by_client.values_mut() {
        calls.sort_by_key(|op| op.invoke);
    }
    let alive = alive_until(ops);
    for calls in by_client.values() {
        holdings_of(calls, &alive, &mut verdict);
        count_attempts(calls, &mut verdict);
    }
    verdict.holdings.sort_by_key(|h| h.from);
    mutual_exclusion(&mut verdict);
    reads_agree(ops, final_from, &mut verdict);
    verdict
}

/// Per session: the earliest moment it may have been invalidated (the
/// latest invocation of a create or renewal answered 200, plus the TTL).
fn alive_until(ops: &[LockOp]) -> HashMap<&str, u64> {
    let ttls: HashMap<&str, u64> = ops
        .iter()
        .filter_map(|op| match (op.call, &op.outcome) {
            (LockCall::Create { ttl_ns }, LockOutcome::Ok) => Some((op.session.as_str(), ttl_ns)),
            _ => None,
        })
        .collect();
    let mut alive: HashMap<&str, u64> = HashMap::new();
    for op in ops {
        let confirmed = matches!(op.call, LockCall::Create { .. } | LockCall::Renew)
            && op.outcome == LockOutcome::Ok;
        if let (true, Some(ttl)) = (confirmed, ttls.get(op.session.as_str())) {
            let until = op.invoke.saturating_add(*ttl);
            let entry = alive.entry(op.session.as_str()).or_insert(0);
            *entry = (*entry).max(until);
        }
    }
    alive
}

/// One client's holdings: each acquire answered `true`, to its release.
fn holdings_of(calls: &[&LockOp], alive: &HashMap<&str, u64>, verdict: &mut LockVerdict) {
    for (i, op) in calls.iter().enumerate() {
        if !matches!(op.call, LockCall::Acquire { .. }) || op.outcome != LockOutcome::Ok {
            continue;
        }
        let Some(from) = op.complete else { continue };
        let release_at = calls[i + 1..]
            .iter()
            .find(|o| o.call == LockCall::Release && o.session == op.session)
            .map_or(u64::MAX, |o| o.invoke);
        let alive_until = alive.get(op.session.as_str()).copied().unwrap_or(0);
        let holding = Holding {
            client: op.client,
            session: op.session.clone(),
            from,
            release_at,
            alive_until,
            lock_index: None,
            tainted: calls[..i].iter().any(|o| {
                matches!(o.call, LockCall::Release | LockCall::Destroy)
                    && o.session == op.session
                    && o.outcome == LockOutcome::Unknown
            }),
        };
        if holding.to() <= from {
            verdict.cut_to_nothing += 1;
            continue;
        }
        if holding.tainted {
            verdict.tainted.push(holding);
            continue;
        }
        if alive_until < release_at {
            verdict.cut_by_ttl += 1;
        }
        verdict.holdings.push(holding);
    }
}

/// Attempts that ended `true` (T) and acquire calls with an unknown
/// outcome (U), for the LockIndex bounds.
fn count_attempts(calls: &[&LockOp], verdict: &mut LockVerdict) {
    let mut acquired: std::collections::BTreeSet<(u32, &str)> = Default::default();
    for op in calls {
        if let LockCall::Acquire { attempt } = op.call {
            match op.outcome {
                LockOutcome::Ok => {
                    acquired.insert((attempt, op.session.as_str()));
                }
                LockOutcome::Unknown => verdict.unknown_acquires += 1,
                _ => {}
            }
        }
    }
    verdict.acquired_attempts += acquired.len();
}

/// No two safe intervals overlap.
fn mutual_exclusion(verdict: &mut LockVerdict) {
    // Sorted by start: each interval against the one reaching furthest
    // among those before it finds every overlap (at least one per
    // overlapping pair's later member).
    let mut furthest: Option<&Holding> = None;
    let mut violations = Vec::new();
    let mut handoffs = 0;
    let mut previous: Option<&Holding> = None;
    for h in &verdict.holdings {
        if let Some(f) = furthest
            && h.from < f.to()
        {
            violations.push(format!(
                "TWO HOLDERS: client {} (session {}) held the lock over [{}, {}) and client {} (session {}) over [{}, {}) (ms since start; overlap {:.3} ms){}{}",
                f.client,
                f.session,
                ms(f.from),
                ms(f.to()),
                h.client,
                h.session,
                ms(h.from),
                ms(h.to()),
                (f.to().min(h.to()) - h.from) as f64 / 1e6,
                ending(f),
                ending(h),
            ));
        }
        if furthest.is_none_or(|f| h.to() > f.to()) {
            furthest = Some(h);
        }
        if previous.is_some_and(|p| p.client != h.client) {
            handoffs += 1;
        }
        previous = Some(h);
    }
    verdict.handoffs = handoffs;
    verdict.violations.extend(violations);
}

fn ending(h: &Holding) -> String {
    if h.alive_until < h.release_at {
        format!(
            "; client {}'s interval ends at its session's TTL bound {}",
            h.client,
            ms(h.alive_until)
        )
    } else {
        String::new()
    }
}

/// The reads against the holdings and each other.
fn reads_agree(ops: &[LockOp], final_from: u64, verdict: &mut LockVerdict) {
    let reads: Vec<(&LockOp, &LockState, u64)> = ops
        .iter()
        .filter_map(|op| match (&op.outcome, op.complete) {
            (LockOutcome::Seen(state), Some(complete)) => Some((op, state, complete)),
            _ => None,
        })
        .collect();
    verdict.reads = reads.len();
    let mut problems = Vec::new();
    let describe = |op: &LockOp, s: &LockState| {
        format!(
            "client {}'s read via {} over [{}, {}] saw Session {:?} LockIndex {} ModifyIndex {}",
            op.client,
            op.via,
            ms(op.invoke),
            ms(op.complete.unwrap_or(u64::MAX)),
            s.session,
            s.lock_index,
            s.modify_index
        )
    };

    // A read wholly inside a holding's safe interval sees its session;
    // the holder's own such read gives the holding's LockIndex.
    let mut inside = 0;
    for h in &mut verdict.holdings {
        for (op, state, complete) in &reads {
            if op.invoke < h.from || *complete > h.to() {
                continue;
            }
            inside += 1;
            if state.session.as_deref() != Some(h.session.as_str()) {
                problems.push(format!(
                    "a read inside client {}'s holding [{}, {}) (session {}) did not see it: {}",
                    h.client,
                    ms(h.from),
                    ms(h.to()),
                    h.session,
                    describe(op, state)
                ));
            } else if op.client == h.client {
                h.lock_index = Some(state.lock_index);
            }
        }
    }
    verdict.reads_inside_holdings = inside;

    // Two holdings, two LockIndexes.
    let mut holding_at: HashMap<u64, &Holding> = HashMap::new();
    for h in &verdict.holdings {
        if let Some(index) = h.lock_index
            && let Some(other) = holding_at.insert(index, h)
        {
            problems.push(format!(
                "two acquisitions with one LockIndex {index}: client {} at {} and client {} at {}",
                other.client,
                ms(other.from),
                h.client,
                ms(h.from)
            ));
        }
    }

    // One LockIndex, one session.
    let mut session_at: HashMap<u64, (&LockOp, &LockState)> = HashMap::new();
    for (op, state, _) in &reads {
        let Some(session) = &state.session else {
            continue;
        };
        match session_at.get(&state.lock_index) {
            Some((first, seen)) if seen.session.as_ref() != Some(session) => {
                problems.push(format!(
                    "LockIndex {} seen with two sessions: {} / {}",
                    state.lock_index,
                    describe(first, seen),
                    describe(op, state)
                ));
            }
            Some(_) => {}
            None => {
                session_at.insert(state.lock_index, (op, state));
            }
        }
    }

    // Real time: a read that began after another ended sees no lower
    // LockIndex or ModifyIndex.
    let mut by_complete: Vec<&(&LockOp, &LockState, u64)> = reads.iter().collect();
    by_complete.sort_by_key(|r| r.2);
    let mut by_invoke: Vec<&(&LockOp, &LockState, u64)> = reads.iter().collect();
    by_invoke.sort_by_key(|r| r.0.invoke);
    let mut highest: Option<&(&LockOp, &LockState, u64)> = None;
    let mut next = 0;
    for r in by_invoke {
        while next < by_complete.len() && by_complete[next].2 < r.0.invoke {
            let candidate = by_complete[next];
            if highest.is_none_or(|h| {
                (candidate.1.lock_index, candidate.1.modify_index)
                    > (h.1.lock_index, h.1.modify_index)
            }) {
                highest = Some(candidate);
            }
            next += 1;
        }
        if let Some(h) = highest
            && (r.1.lock_index < h.1.lock_index || r.1.modify_index < h.1.modify_index)
        {
            problems.push(format!(
                "went back in time: {} after {}",
                describe(r.0, r.1),
                describe(h.0, h.1)
            ));
        }
    }

    // The count: at most T + U everywhere, at least T at the end.
    let most = (verdict.acquired_attempts + verdict.unknown_acquires) as u64;
    for (op, state, _) in &reads {
        if state.lock_index > most {
            problems.push(format!(
                "LockIndex above the {} acquisitions that may have happened: {}",
                most,
                describe(op, state)
            ));
        }
    }
    let finals: Vec<&(&LockOp, &LockState, u64)> =
        reads.iter().filter(|r| r.0.invoke >= final_from).collect();
    verdict.final_lock_index = finals.iter().map(|r| r.1.lock_index).max();
    match verdict.final_lock_index {
        None => problems.push("no final read of the lock succeeded".into()),
        Some(last) if last < verdict.acquired_attempts as u64 => problems.push(format!(
            "final LockIndex {last} is below the {} acquisitions the clients were told of",
            verdict.acquired_attempts
        )),
        Some(_) => {}
    }
    // At most a few of each kind: one is enough to fail.
    problems.truncate(40);
    verdict.violations.extend(problems);
}

fn ms(ns: u64) -> String {
    if ns == u64::MAX {
        "never".into()
    } else {
        format!("{:.3}", ns as f64 / 1e6)
    }
}

/// The history, one call a line, by invocation time.
pub fn format_lock_history(ops: &[LockOp]) -> String {
    let mut sorted: Vec<&LockOp> = ops.iter().collect();
    sorted.sort_by_key(|op| op.invoke);
    let mut text = String::new();
    for op in sorted {
        let _ = writeln!(
            text,
            "{:>12} {:>12} c{:<4} {:<4} {:<36} {:?} -> {:?}",
            ms(op.invoke),
            op.complete.map_or("?".into(), ms),
            op.client,
            op.via,
            op.session,
            op.call,
            op.outcome
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const TTL: u64 = 10_000 * MS;

    fn op(
        client: u32,
        session: &str,
        call: LockCall,
        outcome: LockOutcome,
        invoke_ms: u64,
        complete_ms: Option<u64>,
    ) -> LockOp {
        LockOp {
            client,
            session: session.into(),
            call,
            outcome,
            invoke: invoke_ms * MS,
            complete: complete_ms.map(|c| c * MS),
            via: "n1".into(),
        }
    }

    fn create(client: u32, session: &str, at: u64) -> LockOp {
        op(
            client,
            session,
            LockCall::Create { ttl_ns: TTL },
            LockOutcome::Ok,
            at,
            Some(at + 5),
        )
    }

    fn acquire(client: u32, session: &str, attempt: u32, at: u64, outcome: LockOutcome) -> LockOp {
        let complete = (outcome != LockOutcome::Unknown).then_some(at + 5);
        op(
            client,
            session,
            LockCall::Acquire { attempt },
            outcome,
            at,
            complete,
        )
    }

    fn release(client: u32, session: &str, at: u64) -> LockOp {
        op(
            client,
            session,
            LockCall::Release,
            LockOutcome::Ok,
            at,
            Some(at + 5),
        )
    }

    fn read(client: u32, at: u64, session: Option<&str>, lock_index: u64, modify: u64) -> LockOp {
        op(
            client,
            "",
            LockCall::Read,
            LockOutcome::Seen(LockState {
                session: session.map(str::to_owned),
                lock_index,
                modify_index: modify,
            }),
            at,
            Some(at + 5),
        )
    }

    /// Two clients taking turns, each reading while it holds, and a final
    /// read: the history a correct cluster gives.
    fn turns() -> Vec<LockOp> {
        vec![
            create(1, "a", 0),
            create(2, "b", 0),
            acquire(1, "a", 1, 100, LockOutcome::Ok),
            read(1, 110, Some("a"), 1, 10),
            acquire(2, "b", 1, 120, LockOutcome::Refused),
            release(1, "a", 200),
            acquire(2, "b", 2, 210, LockOutcome::Ok),
            read(2, 220, Some("b"), 2, 12),
            release(2, "b", 300),
            read(1000, 400, None, 2, 13),
        ]
    }

    #[test]
    fn turns_taken_one_at_a_time_pass() {
        let v = check_lock_history(&turns(), 400 * MS);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.holdings.len(), 2);
        assert_eq!(v.handoffs, 1);
        assert_eq!(v.reads_inside_holdings, 2);
        assert_eq!(v.final_lock_index, Some(2));
        assert_eq!(v.holdings[1].lock_index, Some(2));
    }

    #[test]
    fn two_overlapping_holdings_fail() {
        // Client 2 is told `true` while client 1 has not released yet.
        let mut ops = turns();
        ops[6] = acquire(2, "b", 2, 150, LockOutcome::Ok);
        let v = check_lock_history(&ops, 400 * MS);
        assert!(
            v.violations.iter().any(|p| p.contains("TWO HOLDERS")),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn a_holding_ends_at_its_sessions_ttl_bound() {
        // Client 1 never renews and never releases; client 2 takes the
        // lock 10.5 s after client 1's session was created: past the TTL
        // bound (creation + 10 s), so no overlap...
        let mut ops = vec![
            create(1, "a", 0),
            create(2, "b", 5_000),
            acquire(1, "a", 1, 100, LockOutcome::Ok),
            acquire(2, "b", 1, 10_500, LockOutcome::Ok),
            release(2, "b", 10_600),
            read(1000, 11_000, None, 2, 13),
        ];
        let v = check_lock_history(&ops, 11_000 * MS);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.cut_by_ttl, 1);
        // ...but a renewal of client 1's session at 5 s, answered 200,
        // keeps it alive until 15 s: client 2 then held it together with
        // client 1.
        ops.push(op(
            1,
            "a",
            LockCall::Renew,
            LockOutcome::Ok,
            5_000,
            Some(5_010),
        ));
        let v = check_lock_history(&ops, 11_000 * MS);
        assert!(
            v.violations.iter().any(|p| p.contains("TWO HOLDERS")),
            "{:?}",
            v.violations
        );
        // A renewal whose answer was lost proves nothing: no overlap.
        let last = ops.len() - 1;
        ops[last].outcome = LockOutcome::Unknown;
        ops[last].complete = None;
        let v = check_lock_history(&ops, 11_000 * MS);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
    }

    #[test]
    fn an_unknown_acquire_is_no_holding_but_may_count() {
        // Client 2's acquire is unknown (it did take effect: LockIndex 2).
        let ops = vec![
            create(1, "a", 0),
            create(2, "b", 0),
            acquire(1, "a", 1, 100, LockOutcome::Ok),
            release(1, "a", 200),
            acquire(2, "b", 1, 150, LockOutcome::Unknown),
            read(1000, 3_000, Some("b"), 2, 13),
        ];
        let v = check_lock_history(&ops, 3_000 * MS);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!((v.acquired_attempts, v.unknown_acquires), (1, 1));
        // Without the unknown call, LockIndex 2 has no acquisition.
        let v = check_lock_history(
            &[ops[0].clone(), ops[2].clone(), ops[5].clone()],
            3_000 * MS,
        );
        assert!(
            v.violations.iter().any(|p| p.contains("above the 1")),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn a_holding_after_an_unknown_release_of_its_session_is_not_counted_on() {
        // What the fault suite saw: client 1's release through a cut-off
        // server stays unknown; it releases again (true), acquires again
        // with the same session — and the first release, applied late,
        // ends that holding: client 2 takes the lock while client 1
        // believes it holds it.
        let mut ops = vec![
            create(1, "a", 0),
            create(2, "b", 0),
            acquire(1, "a", 1, 100, LockOutcome::Ok),
            op(1, "a", LockCall::Release, LockOutcome::Unknown, 200, None),
            release(1, "a", 2_300),
            acquire(1, "a", 2, 2_400, LockOutcome::Ok),
            acquire(2, "b", 1, 2_500, LockOutcome::Ok),
            release(2, "b", 2_600),
            release(1, "a", 2_700),
            read(1000, 3_000, None, 3, 20),
        ];
        let v = check_lock_history(&ops, 3_000 * MS);
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!((v.holdings.len(), v.tainted.len()), (2, 1));
        // Had that release been answered, the overlap is a violation.
        ops[3].outcome = LockOutcome::Ok;
        ops[3].complete = Some(205 * MS);
        let v = check_lock_history(&ops, 3_000 * MS);
        assert!(
            v.violations.iter().any(|p| p.contains("TWO HOLDERS")),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn reads_that_contradict_the_holdings_fail() {
        // A read inside client 2's holding sees nobody.
        let mut ops = turns();
        ops.push(read(3, 230, None, 2, 12));
        let v = check_lock_history(&ops, 400 * MS);
        assert!(
            v.violations.iter().any(|p| p.contains("did not see it")),
            "{:?}",
            v.violations
        );
        // Client 2 reads LockIndex 1 in its holding: the handoff did not
        // count an acquisition (and one LockIndex has two sessions).
        let mut ops = turns();
        ops[7] = read(2, 220, Some("b"), 1, 12);
        let v = check_lock_history(&ops, 400 * MS);
        assert!(
            v.violations
                .iter()
                .any(|p| p.contains("one LockIndex 1") || p.contains("two sessions")),
            "{:?}",
            v.violations
        );
        // A read after another ended sees an older index.
        let mut ops = turns();
        ops.push(read(3, 350, None, 1, 11));
        let v = check_lock_history(&ops, 400 * MS);
        assert!(
            v.violations.iter().any(|p| p.contains("went back")),
            "{:?}",
            v.violations
        );
        // The final LockIndex lags the acquisitions the clients were told.
        let mut ops = turns();
        ops[9] = read(1000, 400, None, 1, 13);
        let v = check_lock_history(&ops, 400 * MS);
        assert!(
            v.violations.iter().any(|p| p.contains("final LockIndex 1")),
            "{:?}",
            v.violations
        );
    }
}
