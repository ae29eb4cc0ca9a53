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
//! answers 429 with `retry-after`). `RequestsMaxBurst` defaults to
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
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
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
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Option<Instant>)>,
}

impl Bucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), None)),
        }
    }

    /// Takes a token at `now`; `Err(wait)` when there is none, with how
    /// long until the next one.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        if let Some(last) = *last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        }
        *last = Some(now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
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
        let [instance] = fields(obj, &["InstanceLevel"], at).map_err(text)?;
        let Some(instance) = instance else {
            return Ok(Self {
                instance: None,
                routes: Vec::new(),
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
            let route = object(route, &r_at).map_err(text)?;
            let [exact, prefix, regex, r_rps, r_burst] = fields(
                route,
                &[
                    "PathExact",
                    "PathPrefix",
                    "PathRegex",
                    "RequestsPerSecond",
                    "RequestsMaxBurst",
                ],
                &r_at,
            )
            .map_err(text)?;
            let exact = nonempty_string(exact, &join(&r_at, "PathExact")).map_err(text)?;
            let prefix = nonempty_string(prefix, &join(&r_at, "PathPrefix")).map_err(text)?;
            let regex = nonempty_string(regex, &join(&r_at, "PathRegex")).map_err(text)?;
            let path = match (exact, prefix, regex) {
                (Some(p), None, None) => PathMatch::Exact(p.to_owned()),
                (None, Some(p), None) => PathMatch::Prefix(p.to_owned()),
                (None, None, Some(r)) => PathMatch::Regex(
                    regex::Regex::new(&format!(r"\A(?:{r})\z"))
                        .map_err(|e| format!("{r_at}.PathRegex: {e}"))?,
                ),
                _ => {
                    return Err(format!(
                        "{r_at}: set exactly one of PathExact, PathPrefix or PathRegex"
                    ));
                }
            };
            let bucket = bucket(r_rps, r_burst, &r_at)?
                .ok_or_else(|| format!("{r_at}.RequestsPerSecond: must be set"))?;
            compiled.push((path, bucket));
        }
        Ok(Self {
            instance: bucket(rps, burst, &i_at)?,
            routes: compiled,
        })
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
