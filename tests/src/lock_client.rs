//! The fault suite's lock clients: contenders for one Consul lock, each
//! with a session of its own (a short TTL, renewed as it goes, made anew
//! when it is gone), acquiring, holding for a moment, releasing — every
//! call recorded with its invocation and completion times as a
//! [`LockOp`], for `lock_history`'s checks. Like `workload`, it knows
//! nothing about faults or namespaces.
//!
//! A client never uses a session whose hold on the lock it cannot know:
//! after an acquire attempt whose outcome stayed unknown it releases until
//! it gets an answer; after a release whose outcome was unknown — even if
//! a retry was then answered — it gives the session up (destroys it, best
//! effort, and makes a new one), since that release may still be applied
//! later and would end a next holding of the same session (the fault
//! suite saw one land seconds after the heal of a cut-off server).

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::lock_history::{LockCall, LockOp, LockOutcome, LockState};
use crate::workload::{Shared, SplitMix, Target};

/// How a contender behaves.
#[derive(Debug, Clone)]
pub struct LockSettings {
    /// The lock key (outside every prefix another check reads).
    pub key: String,
    /// Its sessions' TTL (Consul's minimum is 10 s).
    pub ttl: Duration,
    /// How often it renews its session.
    pub renew_every: Duration,
    /// How long it holds the lock, at least and at most.
    pub hold: (Duration, Duration),
    /// Calls at most (besides `Shared::stop`).
    pub max_ops: usize,
}

/// Calls of one acquire attempt, and of one release, at most.
const ACQUIRE_CALLS: u32 = 3;
const RELEASE_CALLS: u32 = 5;

/// How an acquire attempt ended.
enum Attempt {
    Held,
    /// Answered false, or surely no effect.
    NotHeld,
    /// Its session is gone.
    SessionGone,
    /// Only unknown answers (and perhaps refusals after them).
    Uncertain,
}

/// One contender, until [`Shared::stop`] or `max_ops` calls.
pub async fn run_lock_client(
    shared: Shared,
    client: u32,
    targets: Vec<Target>,
    settings: LockSettings,
) -> Vec<LockOp> {
    let mut c = Contender {
        shared: &shared,
        client,
        targets: &targets,
        settings: &settings,
        rng: SplitMix(u64::from(client).wrapping_mul(0x9E37_79B9) ^ shared.now()),
        ops: Vec::new(),
    };
    let mut session: Option<String> = None;
    let mut renewed_at = 0u64;
    let mut attempt = 0u32;
    while !shared.stop.load(Ordering::Relaxed) && c.ops.len() < settings.max_ops {
        if targets.is_empty() {
            break;
        }
        let Some(sid) = session.clone() else {
            session = c.create().await;
            renewed_at = shared.now();
            if session.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        if shared.now().saturating_sub(renewed_at) >= settings.renew_every.as_nanos() as u64 {
            renewed_at = shared.now();
            if c.call(&sid, LockCall::Renew).await == LockOutcome::Refused {
                // 404: the session is gone (expired or destroyed).
                session = None;
                continue;
            }
        }
        attempt += 1;
        let keep = match c.acquire(&sid, attempt).await {
            Attempt::Held => {
                c.read(&sid).await;
                let (least, most) = settings.hold;
                let spread = most.saturating_sub(least).as_millis() as u64;
                let hold = least + Duration::from_millis(c.rng.below(spread + 1));
                tokio::time::sleep(hold).await;
                c.release(&sid).await
            }
            Attempt::NotHeld => {
                // Now and then, whom the lock is with (more reads for the
                // LockIndex checks).
                if c.rng.below(3) == 0 {
                    c.read(&sid).await;
                }
                true
            }
            Attempt::SessionGone => false,
            Attempt::Uncertain => c.release(&sid).await,
        };
        if !keep {
            session = None;
        }
        tokio::time::sleep(Duration::from_millis(20 + c.rng.below(80))).await;
    }
    c.ops
}

/// The final reads: the lock key through every server, recorded as
/// client `1000 + i`.
pub async fn final_reads(shared: &Shared, targets: &[Target], key: &str) -> Vec<LockOp> {
    let mut ops = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let settings = LockSettings {
            key: key.to_owned(),
            ttl: Duration::ZERO,
            renew_every: Duration::ZERO,
            hold: (Duration::ZERO, Duration::ZERO),
            max_ops: 1,
        };
        let mut c = Contender {
            shared,
            client: 1000 + i as u32,
            targets: std::slice::from_ref(target),
            settings: &settings,
            rng: SplitMix(0),
            ops: Vec::new(),
        };
        c.read("").await;
        ops.append(&mut c.ops);
    }
    ops
}

struct Contender<'a> {
    shared: &'a Shared,
    client: u32,
    targets: &'a [Target],
    settings: &'a LockSettings,
    rng: SplitMix,
    ops: Vec<LockOp>,
}

impl Contender<'_> {
    fn target(&mut self) -> Target {
        self.targets[self.rng.below(self.targets.len() as u64) as usize].clone()
    }

    /// A new session; its ID.
    async fn create(&mut self) -> Option<String> {
        let target = self.target();
        let ttl = self.settings.ttl;
        let body = serde_json::json!({
            "Name": format!("contender-{}", self.client),
            "TTL": format!("{}s", ttl.as_secs()),
            "LockDelay": "0s",
            // No node checks: only its TTL, or its destruction, ends it.
            "NodeChecks": [],
        });
        let invoke = self.shared.now();
        let url = format!("{}/v1/session/create", target.http);
        let sent = self.shared.http.put(url).json(&body).send().await;
        let (outcome, id) = match sent {
            Ok(resp) if resp.status() == 200 => match resp.json::<serde_json::Value>().await {
                Ok(v) => match v["ID"].as_str() {
                    Some(id) => (LockOutcome::Ok, Some(id.to_owned())),
                    None => (LockOutcome::Unknown, None),
                },
                Err(_) => (LockOutcome::Unknown, None),
            },
            Ok(resp) if resp.status().is_client_error() => {
                (LockOutcome::Failed { gone: false }, None)
            }
            Err(e) if e.is_connect() => (LockOutcome::Failed { gone: false }, None),
            // A session made whose ID never came back holds nothing and
            // ends with its TTL.
            _ => (LockOutcome::Unknown, None),
        };
        self.record(
            id.as_deref().unwrap_or(""),
            LockCall::Create {
                ttl_ns: ttl.as_nanos() as u64,
            },
            outcome,
            invoke,
            &target,
        );
        id
    }

    /// One attempt: acquire calls until an answer, at most
    /// [`ACQUIRE_CALLS`].
    async fn acquire(&mut self, sid: &str, attempt: u32) -> Attempt {
        let mut unknown = false;
        for _ in 0..ACQUIRE_CALLS {
            match self.call(sid, LockCall::Acquire { attempt }).await {
                LockOutcome::Ok => return Attempt::Held,
                LockOutcome::Refused if !unknown => return Attempt::NotHeld,
                LockOutcome::Refused => return Attempt::Uncertain,
                LockOutcome::Failed { gone: true } => return Attempt::SessionGone,
                LockOutcome::Failed { gone: false } if !unknown => return Attempt::NotHeld,
                LockOutcome::Unknown => unknown = true,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Attempt::Uncertain
    }

    /// Releases until an answer, at most [`RELEASE_CALLS`]; false when the
    /// session must be given up: it is gone, or a release of it had an
    /// unknown outcome (it may yet land; the session is destroyed, best
    /// effort).
    async fn release(&mut self, sid: &str) -> bool {
        let mut unknown = false;
        for _ in 0..RELEASE_CALLS {
            match self.call(sid, LockCall::Release).await {
                LockOutcome::Ok | LockOutcome::Refused if !unknown => return true,
                LockOutcome::Ok | LockOutcome::Refused => break,
                LockOutcome::Failed { gone: true } => return false,
                LockOutcome::Unknown => unknown = true,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.call(sid, LockCall::Destroy).await;
        false
    }

    /// A `PUT` about the lock or the session: renew, destroy, acquire,
    /// release.
    async fn call(&mut self, sid: &str, call: LockCall) -> LockOutcome {
        let target = self.target();
        let key = &self.settings.key;
        let url = match call {
            LockCall::Renew => format!("{}/v1/session/renew/{sid}", target.http),
            LockCall::Destroy => format!("{}/v1/session/destroy/{sid}", target.http),
            LockCall::Acquire { .. } => format!("{}/v1/kv/{key}?acquire={sid}", target.http),
            LockCall::Release => format!("{}/v1/kv/{key}?release={sid}", target.http),
            LockCall::Create { .. } | LockCall::Read => unreachable!("not a plain PUT"),
        };
        let invoke = self.shared.now();
        let body = format!("client {}", self.client);
        let outcome = match self.shared.http.put(url).body(body).send().await {
            Ok(resp) => {
                let status = resp.status();
                match (status.as_u16(), resp.text().await) {
                    (200, Ok(text)) => match (call, text.trim()) {
                        (LockCall::Renew | LockCall::Destroy, _) => LockOutcome::Ok,
                        (_, "true") => LockOutcome::Ok,
                        (_, "false") => LockOutcome::Refused,
                        _ => LockOutcome::Unknown,
                    },
                    (404, Ok(_)) if call == LockCall::Renew => LockOutcome::Refused,
                    // Refused in the apply: the session is gone (the
                    // registry's `invalid_session`), nothing changed.
                    (500, Ok(text)) if text.contains("invalid session") => {
                        LockOutcome::Failed { gone: true }
                    }
                    _ if status.is_client_error() => LockOutcome::Failed { gone: false },
                    _ => LockOutcome::Unknown,
                }
            }
            Err(e) if e.is_connect() => LockOutcome::Failed { gone: false },
            Err(_) => LockOutcome::Unknown,
        };
        self.record(sid, call, outcome.clone(), invoke, &target);
        outcome
    }

    /// A `?consistent` read of the lock key.
    async fn read(&mut self, sid: &str) {
        let target = self.target();
        let invoke = self.shared.now();
        let url = format!("{}/v1/kv/{}?consistent", target.http, self.settings.key);
        let outcome = match self.shared.http.get(url).send().await {
            Ok(resp) if resp.status() == 404 => LockOutcome::Seen(LockState {
                session: None,
                lock_index: 0,
                modify_index: 0,
            }),
            Ok(resp) if resp.status() == 200 => match resp.json::<serde_json::Value>().await {
                Ok(body) => parse_lock(&body).map_or(LockOutcome::Failed { gone: false }, |s| {
                    LockOutcome::Seen(s)
                }),
                Err(_) => LockOutcome::Failed { gone: false },
            },
            // A read has no effect: a failed one is only missing.
            _ => LockOutcome::Failed { gone: false },
        };
        self.record(sid, LockCall::Read, outcome, invoke, &target);
    }

    fn record(
        &mut self,
        sid: &str,
        call: LockCall,
        outcome: LockOutcome,
        invoke: u64,
        target: &Target,
    ) {
        let complete = (outcome != LockOutcome::Unknown).then(|| self.shared.now());
        self.ops.push(LockOp {
            client: self.client,
            session: sid.to_owned(),
            call,
            outcome,
            invoke,
            complete,
            via: target.name.clone(),
        });
    }
}

/// `[{"LockIndex": n, "ModifyIndex": m, "Session": id?}]` → the lock's
/// state.
pub fn parse_lock(body: &serde_json::Value) -> Option<LockState> {
    let entry = body.as_array()?.first()?;
    Some(LockState {
        session: entry
            .get("Session")
            .and_then(|s| s.as_str())
            .map(str::to_owned),
        lock_index: entry.get("LockIndex")?.as_u64()?,
        modify_index: entry.get("ModifyIndex")?.as_u64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_lock_reads_consul_json() {
        let held =
            serde_json::json!([{"Key": "l", "LockIndex": 3, "ModifyIndex": 9, "Session": "s"}]);
        assert_eq!(
            parse_lock(&held),
            Some(LockState {
                session: Some("s".into()),
                lock_index: 3,
                modify_index: 9
            })
        );
        let free = serde_json::json!([{"Key": "l", "LockIndex": 3, "ModifyIndex": 10}]);
        assert_eq!(parse_lock(&free).and_then(|s| s.session), None);
        assert_eq!(parse_lock(&serde_json::json!([{"Key": "l"}])), None);
    }
}
