//! Consul's `service-defaults` `RateLimits`, enforced in the destination's
//! sidecar: a token bucket for the instance and one per route, Envoy's
//! local rate limit as Consul configures it.
//!
//! ```json
//! "RateLimits": {"InstanceLevel": {
//!     "RequestsPerSecond": 50, "RequestsMaxBurst": 100,
//!     "Routes": [{"PathPrefix": "/search", "RequestsPerSecond": 5}]
//! }}
//! ```
//!
//! A request takes a token from the first route whose path matches, else
//! from the instance's bucket; with none left it is refused (the sidecar
//! answers 429 with `retry-after`).
//!
//! Meshwork adds a cluster-wide quota, `"ServiceLevel":
//! {"RequestsPerSecond": 300}`: requests a second across every instance of
//! the service, shared out by the registry to the instances' sidecars in
//! proportion to the traffic each sees ([`quota_shares`]); each enforces
//! its share with a bucket of its own ([`Bucket::set_rate`]). `RequestsMaxBurst` defaults to
//! `RequestsPerSecond` (a second's worth). Parsed once per change
//! ([`RateLimits::parse`], also the registry's check at `PUT`); a request
//! costs one short lock of its bucket.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::intentions::fields::{array, fields, join, nonempty_string, object};

/// The compiled limits of one service.
#[derive(Debug)]
pub struct RateLimits {
    instance: Option<Bucket>,
    routes: Vec<(PathMatch, Bucket)>,
    /// `ServiceLevel.RequestsPerSecond`: the cluster-wide quota.
    service: Option<f64>,
}

/// One `Routes` entry of a limit (`PathExact`, `PathPrefix` or
/// `PathRegex`, `RequestsPerSecond`, `RequestsMaxBurst`): its path, and
/// its rate and burst as given (each user checks them its way).
pub(crate) fn route_entry<'v>(
    route: &'v Value,
    at: &str,
) -> Result<(PathMatch, Option<&'v Value>, Option<&'v Value>), String> {
    let route = object(route, at).map_err(text)?;
    let [exact, prefix, regex, rps, burst] = fields(
        route,
        &[
            "PathExact",
            "PathPrefix",
            "PathRegex",
            "RequestsPerSecond",
            "RequestsMaxBurst",
        ],
        at,
    )
    .map_err(text)?;
    Ok((PathMatch::parse(exact, prefix, regex, at)?, rps, burst))
}

/// Which request paths a limit covers.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PathMatch::Exact(a), PathMatch::Exact(b))
            | (PathMatch::Prefix(a), PathMatch::Prefix(b)) => a == b,
            (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for PathMatch {}

impl PathMatch {
    /// Reads one of `PathExact`, `PathPrefix` or `PathRegex` (exactly
    /// one) of a route at `at`.
    pub fn parse(
        exact: Option<&Value>,
        prefix: Option<&Value>,
        regex: Option<&Value>,
        at: &str,
    ) -> Result<Self, String> {
        let exact = nonempty_string(exact, &join(at, "PathExact")).map_err(text)?;
        let prefix = nonempty_string(prefix, &join(at, "PathPrefix")).map_err(text)?;
        let regex = nonempty_string(regex, &join(at, "PathRegex")).map_err(text)?;
        match (exact, prefix, regex) {
            (Some(p), None, None) => Ok(PathMatch::Exact(p.to_owned())),
            (None, Some(p), None) => Ok(PathMatch::Prefix(p.to_owned())),
            (None, None, Some(r)) => Ok(PathMatch::Regex(
                regex::Regex::new(&format!(r"\A(?:{r})\z"))
                    .map_err(|e| format!("{at}.PathRegex: {e}"))?,
            )),
            _ => Err(format!(
                "{at}: set exactly one of PathExact, PathPrefix or PathRegex"
            )),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` kept.
#[derive(Debug)]
pub struct Bucket {
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl BucketState {
    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
    }
}

impl Bucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            state: Mutex::new(BucketState {
                rate,
                burst: f64::from(burst),
                tokens: f64::from(burst),
                last: None,
            }),
        }
    }

    /// Takes a token at `now`; `Err(wait)` when there is none, with how
    /// long until the next one.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.refill(now);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            Ok(())
        } else if state.rate > 0.0 {
            Err(Duration::from_secs_f64(
                ((1.0 - state.tokens) / state.rate).min(3600.0),
            ))
        } else {
            Err(Duration::from_secs(1))
        }
    }

    /// A new rate from `now` on (tokens earned so far are kept, up to the
    /// new burst: a second's worth, at least 1).
    pub fn set_rate(&self, rate: f64, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.refill(now);
        state.rate = rate.max(0.0);
        state.burst = rate.ceil().max(1.0);
        state.tokens = state.tokens.min(state.burst);
    }
}

/// The cluster-wide quota `quota` (requests a second) shared out among
/// instances that each saw `demands[i]` requests a second lately: in
/// proportion to demand, plus a floor (a tenth of an equal share) so an
/// idle instance can still take its first requests. The shares add up to
/// `quota`.
pub fn quota_shares(quota: f64, demands: &[f64]) -> Vec<f64> {
    if demands.is_empty() {
        return Vec::new();
    }
    let floor = quota / demands.len() as f64 / 10.0;
    let weights: Vec<f64> = demands
        .iter()
        .map(|d| {
            let d = if d.is_nan() {
                0.0
            } else {
                d.clamp(0.0, f64::MAX / 4.0)
            };
            d + floor.max(f64::MIN_POSITIVE)
        })
        .collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| quota * w / total).collect()
}

fn text(e: crate::intentions::IntentionError) -> String {
    e.to_string()
}

/// `RequestsPerSecond` (required, above 0) and `RequestsMaxBurst`.
fn bucket(rps: Option<&Value>, burst: Option<&Value>, at: &str) -> Result<Option<Bucket>, String> {
    let Some(rps) = rps else {
        if burst.is_some() {
            return Err(format!("{at}.RequestsMaxBurst: needs RequestsPerSecond"));
        }
        return Ok(None);
    };
    let rate = rps
        .as_f64()
        .filter(|r| *r > 0.0 && r.is_finite())
        .ok_or_else(|| format!("{at}.RequestsPerSecond: must be a number above 0"))?;
    let burst = match burst {
        None => rate.ceil().max(1.0) as u32,
        Some(b) => b
            .as_u64()
            .and_then(|b| u32::try_from(b).ok())
            .filter(|b| *b >= 1)
            .ok_or_else(|| format!("{at}.RequestsMaxBurst: must be a whole number from 1"))?,
    };
    Ok(Some(Bucket::new(rate, burst)))
}

impl RateLimits {
    /// Reads the `RateLimits` field of a `service-defaults` entry; errors
    /// name the field (`at` is where the field is).
    pub fn parse(value: &Value, at: &str) -> Result<Self, String> {
        let obj = object(value, at).map_err(text)?;
        let [instance, service] =
            fields(obj, &["InstanceLevel", "ServiceLevel"], at).map_err(text)?;
        let service = match service {
            None => None,
            Some(service) => {
                let s_at = join(at, "ServiceLevel");
                let service = object(service, &s_at).map_err(text)?;
                let [rps] = fields(service, &["RequestsPerSecond"], &s_at).map_err(text)?;
                let rate = rps
                    .and_then(Value::as_f64)
                    .filter(|r| *r > 0.0 && r.is_finite())
                    .ok_or_else(|| format!("{s_at}.RequestsPerSecond: must be a number above 0"))?;
                Some(rate)
            }
        };
        let Some(instance) = instance else {
            return Ok(Self {
                instance: None,
                routes: Vec::new(),
                service,
            });
        };
        let i_at = join(at, "InstanceLevel");
        let instance = object(instance, &i_at).map_err(text)?;
        let [rps, burst, routes] = fields(
            instance,
            &["RequestsPerSecond", "RequestsMaxBurst", "Routes"],
            &i_at,
        )
        .map_err(text)?;
        let mut compiled = Vec::new();
        for (i, route) in array(routes, &join(&i_at, "Routes"))
            .map_err(text)?
            .iter()
            .enumerate()
        {
            let r_at = format!("{i_at}.Routes[{i}]");
            let (path, r_rps, r_burst) = route_entry(route, &r_at)?;
            let bucket = bucket(r_rps, r_burst, &r_at)?
                .ok_or_else(|| format!("{r_at}.RequestsPerSecond: must be set"))?;
            compiled.push((path, bucket));
        }
        Ok(Self {
            instance: bucket(rps, burst, &i_at)?,
            routes: compiled,
            service,
        })
    }

    /// The cluster-wide quota (`ServiceLevel.RequestsPerSecond`), if any.
    pub fn service_quota(&self) -> Option<f64> {
        self.service
    }

    /// Reads `RateLimits` from a `service-defaults` body, if it has one.
    pub fn from_service_defaults(
        name: &str,
        body: &Map<String, Value>,
    ) -> Result<Option<Self>, String> {
        body.iter()
            .find(|(k, _)| k.replace('_', "").eq_ignore_ascii_case("ratelimits"))
            .map(|(_, v)| Self::parse(v, &format!("service-defaults {name:?}.RateLimits")))
            .transpose()
    }

    /// Whether a request for `path` may go on at `now`; `Err(wait)` until
    /// the bucket it draws from has a token again.
    pub fn admit(&self, path: &str, now: Instant) -> Result<(), Duration> {
        match self.routes.iter().find(|(m, _)| m.matches(path)) {
            Some((_, bucket)) => bucket.take(now),
            None => match &self.instance {
                Some(bucket) => bucket.take(now),
                None => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn buckets_refill_at_their_rate_and_hold_a_burst() {
        let limits = RateLimits::parse(
            &json!({"InstanceLevel": {"RequestsPerSecond": 10, "RequestsMaxBurst": 3,
                    "Routes": [{"PathPrefix": "/slow", "RequestsPerSecond": 1}]}}),
            "RateLimits",
        )
        .expect("parses");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limits.admit("/", t0).is_ok());
        }
        let wait = limits.admit("/", t0).expect_err("burst spent");
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(limits.admit("/", t0 + Duration::from_millis(100)).is_ok());
        // The route has its own bucket of one a second.
        assert!(limits.admit("/slow/x", t0).is_ok());
        assert!(
            limits
                .admit("/slow/x", t0 + Duration::from_millis(500))
                .is_err()
        );
        assert!(
            limits
                .admit("/slow/x", t0 + Duration::from_millis(1000))
                .is_ok()
        );
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limits.admit("/", later).is_ok());
        }
        assert!(limits.admit("/", later).is_err());
    }

    #[test]
    fn quota_shares_follow_demand_and_add_up_to_the_quota() {
        let shares = quota_shares(30.0, &[0.0, 0.0, 0.0]);
        assert!(shares.iter().all(|s| (s - 10.0).abs() < 1e-9), "{shares:?}");
        let shares = quota_shares(30.0, &[100.0, 0.0, 0.0]);
        assert!(shares[0] > 29.0 && shares[1] > 0.0, "{shares:?}");
        let shares = quota_shares(30.0, &[60.0, 30.0, 10.0]);
        assert!(shares[0] > shares[1] && shares[1] > shares[2], "{shares:?}");
        for shares in [shares, quota_shares(7.5, &[1e300, f64::NAN, 3.0])] {
            let total: f64 = shares.iter().sum();
            assert!(
                shares.iter().all(|s| s.is_finite() && *s >= 0.0),
                "{shares:?}"
            );
            assert!(total > 0.0, "{shares:?}");
        }
        assert!(quota_shares(10.0, &[]).is_empty());
        let limits = RateLimits::parse(
            &json!({"ServiceLevel": {"RequestsPerSecond": 300}}),
            "RateLimits",
        )
        .expect("parses");
        assert_eq!(limits.service_quota(), Some(300.0));
        assert!(
            limits.admit("/", Instant::now()).is_ok(),
            "no instance limit"
        );
    }

    #[test]
    fn a_bucket_takes_a_new_rate_live() {
        let bucket = Bucket::new(1.0, 1);
        let t0 = Instant::now();
        assert!(bucket.take(t0).is_ok());
        assert!(bucket.take(t0).is_err());
        bucket.set_rate(100.0, t0);
        assert!(bucket.take(t0 + Duration::from_millis(20)).is_ok());
        bucket.set_rate(0.0, t0 + Duration::from_millis(20));
        // What was earned at the old rate stays (one token, the burst);
        // nothing more comes.
        assert!(bucket.take(t0 + Duration::from_secs(5)).is_ok());
        assert!(bucket.take(t0 + Duration::from_secs(50)).is_err());
    }

    #[test]
    fn bad_limits_are_refused_naming_the_field() {
        for (value, says) in [
            (
                json!({"InstanceLevel": {"RequestsPerSecond": 0}}),
                "RequestsPerSecond: must be a number above 0",
            ),
            (
                json!({"InstanceLevel": {"RequestsMaxBurst": 5}}),
                "needs RequestsPerSecond",
            ),
            (
                json!({"InstanceLevel": {"Routes": [{"PathPrefix": "/a"}]}}),
                "Routes[0].RequestsPerSecond: must be set",
            ),
            (
                json!({"InstanceLevel": {"Routes": [{"PathPrefix": "/a", "PathExact": "/b", "RequestsPerSecond": 1}]}}),
                "exactly one of",
            ),
            (json!({"Instance": {}}), "Instance"),
        ] {
            let err = RateLimits::parse(&value, "RateLimits").expect_err(says);
            assert!(err.contains(says), "{says}: {err}");
        }
    }
}
