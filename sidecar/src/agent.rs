//! The sidecar's agent: registers the service with the registry (retrying
//! with capped, jittered backoff while no server answers), runs its checks
//! locally and reports only status changes, renews the heartbeat session,
//! fails over across the listed registry servers, registers again when the
//! registry has lost the instance, and deregisters on shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshwork_core::backoff::Backoff;
use meshwork_core::health::probe;
use meshwork_core::health::{CheckDefinition, HealthStatus};
use meshwork_proto::v1::agent_client::AgentClient;
use meshwork_proto::v1::{
    AgentCheck, AgentService, CheckStatus, DeregisterRequest, HeartbeatRequest, RegisterRequest,
    SidecarReport, UpdateCheckRequest,
};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::config::{Check, Config, Probe};
use crate::notify;
use crate::policy::applied::AppliedConfig;
use crate::policy::ratelimit::Limits as RateLimits;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the applied config is reported when it does not change (the
/// registry lists a sidecar silent for 30 s as disconnected)...
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// ...and while the service has a cluster-wide quota (each report carries
/// the demand seen and brings back this instance's share).
const REPORT_EVERY_QUOTA: Duration = Duration::from_secs(2);
/// Changes this close together go in one report (an entry change rebuilds
/// every upstream's chain, each a change here).
const REPORT_COALESCE: Duration = Duration::from_millis(5);

/// Service meta key naming the port of the instance's sidecar inbound
/// listener; upstream traffic to the instance goes there.
pub const INBOUND_PORT_META: &str = "meshwork-inbound-port";

/// What `/status` shows.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub registered: bool,
    pub node: String,
    pub service_id: String,
    /// The registry server in use.
    pub registry: Option<String>,
    /// Seconds since the epoch of the last successful call to it.
    pub last_contact_unix: Option<u64>,
    pub last_error: Option<String>,
    pub checks: Vec<CheckState>,
    /// Config reloads (SIGHUP) and how the last one went.
    pub config: ConfigStatus,
}

/// What `/status` shows of the config file and its reloads.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ConfigStatus {
    pub file: String,
    /// Seconds since the epoch when the config in use was loaded.
    pub loaded_unix: Option<u64>,
    pub reloads: u64,
    pub reload_failures: u64,
    /// Why the last reload was refused (the previous config stays in use);
    /// cleared by a successful one.
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckState {
    pub id: String,
    pub target: String,
    pub status: &'static str,
    pub output: String,
    /// Reported to the registry.
    pub reported: bool,
}

pub type SharedStatus = Arc<Mutex<Status>>;

pub(crate) fn lock(status: &SharedStatus) -> std::sync::MutexGuard<'_, Status> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

fn wire(status: HealthStatus) -> i32 {
    match status {
        HealthStatus::Passing => CheckStatus::CheckPassing as i32,
        HealthStatus::Warning => CheckStatus::CheckWarning as i32,
        HealthStatus::Critical => CheckStatus::CheckCritical as i32,
    }
}

/// The registry servers, one in use; a failure moves to the next.
struct Registry {
    addresses: Vec<String>,
    token: crate::RegistryAccess,
    current: usize,
    client: Option<AgentClient<crate::RegistryChannel>>,
}

impl Registry {
    fn new(addresses: Vec<String>, token: crate::RegistryAccess) -> Self {
        Registry {
            addresses,
            token,
            current: 0,
            client: None,
        }
    }

    async fn client(&mut self) -> Result<AgentClient<crate::RegistryChannel>, String> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let addr = &self.addresses[self.current % self.addresses.len()];
        let channel = self.token.channel(addr, Some(RPC_TIMEOUT)).await?;
        let client = AgentClient::with_interceptor(channel, self.token.clone());
        self.client = Some(client.clone());
        Ok(client)
    }

    /// One call on the server in use; errors as one line.
    async fn call<T, F, Fut>(&mut self, call: F) -> Result<T, String>
    where
        F: FnOnce(AgentClient<crate::RegistryChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client().await?;
        call(client)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }

    fn current(&self) -> String {
        self.addresses[self.current % self.addresses.len()].clone()
    }

    fn fail_over(&mut self) {
        self.client = None;
        self.current = (self.current + 1) % self.addresses.len();
    }
}

struct LocalCheck {
    config: Check,
    status: HealthStatus,
    output: String,
    streak: u32,
    streak_status: HealthStatus,
    reported: bool,
}

/// A check result from a probe, a TTL timer or the admin API: the check
/// set's generation (a reload starts a new one; late results of the old
/// set are dropped), the check's index in it, the result.
pub type CheckResult = (u64, usize, probe::ProbeResult);

/// When the app last reported a TTL check.
type LastReport = Arc<Mutex<Instant>>;

/// How the app reports its TTL checks (through the admin API).
#[derive(Debug, Clone)]
pub struct TtlReports {
    results: mpsc::Sender<CheckResult>,
    /// The check set now: its generation and, by check id, (index, when
    /// the app last reported).
    checks: Arc<Mutex<TtlChecks>>,
}

#[derive(Debug, Default)]
struct TtlChecks {
    generation: u64,
    by_id: HashMap<String, (usize, LastReport)>,
}

impl TtlChecks {
    /// The TTL checks of `config`; a check already known by id keeps its
    /// last report time (a reload does not reset the app's reports).
    fn of(config: &Config, generation: u64, before: &TtlChecks) -> TtlChecks {
        let by_id = config
            .checks
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.probe, Probe::Ttl(_)))
            .map(|(i, c)| {
                let last = before
                    .by_id
                    .get(&c.id)
                    .map(|(_, l)| Arc::clone(l))
                    .unwrap_or_else(|| Arc::new(Mutex::new(Instant::now())));
                (c.id.clone(), (i, last))
            })
            .collect();
        TtlChecks { generation, by_id }
    }
}

impl TtlReports {
    /// Records a report for TTL check `check_id`; `Err` names what is wrong.
    ///
    /// Sent while the TTL checks are locked: a reload swaps them under the
    /// same lock, so every report tagged with the old generation is in the
    /// channel before the agent drains it (see [`run`]).
    pub fn report(&self, check_id: &str, status: HealthStatus, note: String) -> Result<(), String> {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let (index, last) = checks
            .by_id
            .get(check_id)
            .ok_or_else(|| format!("no TTL check {check_id:?} in this sidecar's config"))?;
        *last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.results
            .try_send((
                checks.generation,
                *index,
                probe::ProbeResult {
                    status,
                    output: note,
                },
            ))
            .map_err(|_| "the agent is busy or stopping; try again".to_owned())
    }
}

/// The results channel and the TTL check handles for `config`.
pub fn channels(
    config: &Config,
) -> (
    TtlReports,
    mpsc::Sender<CheckResult>,
    mpsc::Receiver<CheckResult>,
) {
    let (tx, rx) = mpsc::channel(256);
    let checks = TtlChecks::of(config, 0, &TtlChecks::default());
    (
        TtlReports {
            results: tx.clone(),
            checks: Arc::new(Mutex::new(checks)),
        },
        tx,
        rx,
    )
}

/// The local checks of `config`; a check already known that probes the
/// same thing keeps its state (a reload does not flap it back to
/// critical). Known by id, or — its id gone, as default ids
/// (`<service id>:check-<n>`) go with a new service id — at the same
/// place in the list: a renamed instance is registered with the status
/// its checks have, not as critical until they run again. A changed
/// probe starts over, as Consul's agent does.
fn local_checks(config: &Config, before: Vec<LocalCheck>) -> Vec<LocalCheck> {
    let mut before: Vec<Option<LocalCheck>> = before.into_iter().map(Some).collect();
    let mut kept: Vec<Option<LocalCheck>> = config
        .checks
        .iter()
        .map(|c| {
            let i = before
                .iter()
                .position(|b| b.as_ref().is_some_and(|b| b.config.id == c.id))?;
            before[i].take().filter(|b| b.config.probe == c.probe)
        })
        .collect();
    // What is left had an id no check has now.
    for ((slot, c), old) in kept.iter_mut().zip(&config.checks).zip(&mut before) {
        if slot.is_none() && old.as_ref().is_some_and(|b| b.config.probe == c.probe) {
            *slot = old.take();
        }
    }
    kept.into_iter()
        .zip(&config.checks)
        .map(|(kept, c)| match kept {
            Some(kept) => LocalCheck {
                config: c.clone(),
                ..kept
            },
            None => LocalCheck {
                config: c.clone(),
                // Consul's default until the first result.
                status: HealthStatus::Critical,
                output: "not run yet".into(),
                streak: 0,
                streak_status: HealthStatus::Critical,
                reported: true,
            },
        })
        .collect()
}

/// Starts the probes and TTL watchdogs of generation `generation`; they
/// stop when the returned token is cancelled.
fn start_probes(
    config: &Config,
    generation: u64,
    ttl_reports: &TtlReports,
    results_tx: &mpsc::Sender<CheckResult>,
) -> CancellationToken {
    let probes = CancellationToken::new();
    let ttl = ttl_reports.checks.lock().unwrap_or_else(|e| e.into_inner());
    for (i, check) in config.checks.iter().enumerate() {
        match &check.probe {
            Probe::Ttl(period) => {
                if let Some((_, last)) = ttl.by_id.get(&check.id) {
                    tokio::spawn(ttl_watchdog(
                        (generation, i),
                        *period,
                        Arc::clone(last),
                        results_tx.clone(),
                        probes.clone(),
                    ));
                }
            }
            _ => {
                tokio::spawn(run_probe(
                    (generation, i),
                    check.clone(),
                    results_tx.clone(),
                    probes.clone(),
                ));
            }
        }
    }
    probes
}

fn heartbeat_timer(config: &Config) -> tokio::time::Interval {
    let mut heartbeat =
        tokio::time::interval((config.session_ttl / 3).max(Duration::from_millis(100)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat
}

/// Runs the agent until `shutdown`, then deregisters. A new config sent on
/// `configs` (a reload) is applied as it comes: checks restart (keeping the
/// state of those with the same id), the registry server list is replaced,
/// and the instance is registered again when anything the registry holds
/// changed (under a new node or service id: the new one first, then the
/// old one deregistered).
pub async fn run(
    mut configs: watch::Receiver<Arc<Config>>,
    status: SharedStatus,
    shutdown: CancellationToken,
    ttl_reports: TtlReports,
    (results_tx, mut results): (mpsc::Sender<CheckResult>, mpsc::Receiver<CheckResult>),
    (applied, limits, traffic): (AppliedConfig, RateLimits, Traffic),
) {
    let mut config: Arc<Config> = Arc::clone(&configs.borrow_and_update());
    let mut registry = Registry::new(config.registry.clone(), config.registry_token.clone());
    let mut generation = 0u64;
    let mut checks = local_checks(&config, Vec::new());
    publish_identity(&status, &config);
    publish_checks(&status, &checks);
    let mut probes = start_probes(&config, generation, &ttl_reports, &results_tx);

    if !register_until_done(&config, &mut registry, &checks, &status, &shutdown).await {
        probes.cancel();
        return;
    }
    notify::ready();

    let mut heartbeat = heartbeat_timer(&config);
    let mut applied_changes = applied.changes();
    // Its first tick is at once: the first report follows registration.
    let mut report_timer = tokio::time::interval(REPORT_EVERY_QUOTA);
    report_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Ok(()) = applied_changes.changed() => {
                tokio::time::sleep(REPORT_COALESCE).await;
                applied_changes.borrow_and_update();
                report_applied(&config, &mut registry, &status, (&applied, &limits, &traffic)).await;
                last_report = Some(Instant::now());
                report_timer.reset();
            }
            _ = report_timer.tick() => {
                let due = limits.quota().is_some()
                    || last_report.is_none_or(|at| at.elapsed() + REPORT_EVERY_QUOTA / 2 >= REPORT_EVERY);
                if due {
                    report_applied(&config, &mut registry, &status, (&applied, &limits, &traffic)).await;
                    last_report = Some(Instant::now());
                }
            }
            Ok(()) = configs.changed() => {
                let next = Arc::clone(&configs.borrow_and_update());
                let before = register_request(&config, &checks);
                generation += 1;
                probes.cancel();
                {
                    let mut ttl = ttl_reports.checks.lock().unwrap_or_else(|e| e.into_inner());
                    *ttl = TtlChecks::of(&next, generation, &ttl);
                }
                // Results already sent (a TTL report answered 200) are not
                // lost: those of the old checks are folded in before their
                // state carries over, those of the new ones after.
                let mut queued = Vec::new();
                while let Ok(result) = results.try_recv() {
                    queued.push(result);
                }
                absorb_all(&mut checks, &mut queued, generation - 1);
                checks = local_checks(&next, std::mem::take(&mut checks));
                absorb_all(&mut checks, &mut queued, generation);
                probes = start_probes(&next, generation, &ttl_reports, &results_tx);
                if registry.addresses != next.registry || registry.token != next.registry_token {
                    tracing::info!(registry = ?next.registry, "registry servers or token changed");
                    registry = Registry::new(next.registry.clone(), next.registry_token.clone());
                }
                if next.session_ttl != config.session_ttl {
                    heartbeat = heartbeat_timer(&next);
                }
                let after = register_request(&next, &checks);
                let moved = (config.node != next.node || config.service_id != next.service_id)
                    .then(|| Arc::clone(&config));
                config = next;
                publish_identity(&status, &config);
                if before != after {
                    // Still registered as before until the new one lands.
                    tracing::info!(service = %config.service_id, "registration changed by a reload; registering again");
                    if !register_until_done(&config, &mut registry, &checks, &status, &shutdown).await {
                        break;
                    }
                    if let Some(old) = moved {
                        tracing::info!(old = %old.service_id, node = %old.node, "deregistering the instance's old identity");
                        deregister(&old, &mut registry, &status).await;
                    }
                }
                publish_checks(&status, &checks);
            }
            Some((from, i, result)) = results.recv() => {
                if from == generation
                    && let Some(check) = checks.get_mut(i)
                    && absorb(check, result)
                {
                    tracing::info!(check = %check.config.id, status = check.status.as_str(), "check status changed");
                    check.reported = false;
                    report(&config, &mut registry, &mut checks, &status).await;
                }
                publish_checks(&status, &checks);
            }
            _ = heartbeat.tick() => {
                match renew(&config, &mut registry, &status).await {
                    Renewal::Alive => {
                        if checks.iter().any(|c| !c.reported) {
                            report(&config, &mut registry, &mut checks, &status).await;
                        }
                    }
                    Renewal::Lost => {
                        tracing::warn!("the registry no longer has this instance; registering again");
                        lock(&status).registered = false;
                        if !register_until_done(&config, &mut registry, &checks, &status, &shutdown).await {
                            break;
                        }
                    }
                    Renewal::Failed => {}
                }
                publish_checks(&status, &checks);
            }
        }
    }
    probes.cancel();
    notify::stopping();
    if deregister(&config, &mut registry, &status).await {
        lock(&status).registered = false;
    }
}

/// Folds the queued results of `generation` into `checks` (they are taken
/// out of `queued`); a flip is reported later.
fn absorb_all(checks: &mut [LocalCheck], queued: &mut Vec<CheckResult>, generation: u64) {
    let (mine, rest) = std::mem::take(queued)
        .into_iter()
        .partition(|(from, ..)| *from == generation);
    *queued = rest;
    for (_, i, result) in mine {
        if let Some(check) = checks.get_mut(i)
            && absorb(check, result)
        {
            tracing::info!(check = %check.config.id, status = check.status.as_str(), "check status changed");
            check.reported = false;
        }
    }
}

fn publish_identity(status: &SharedStatus, config: &Config) {
    let mut s = lock(status);
    s.node = config.node.clone();
    s.service_id = config.service_id.clone();
}

fn publish_checks(status: &SharedStatus, checks: &[LocalCheck]) {
    lock(status).checks = checks
        .iter()
        .map(|c| CheckState {
            id: c.config.id.clone(),
            target: c.config.probe.target(),
            status: c.status.as_str(),
            output: c.output.clone(),
            reported: c.reported,
        })
        .collect();
}

/// Folds a probe result in; true when the check's status flips.
fn absorb(check: &mut LocalCheck, result: probe::ProbeResult) -> bool {
    if result.status == check.streak_status {
        check.streak = check.streak.saturating_add(1);
    } else {
        check.streak_status = result.status;
        check.streak = 1;
    }
    check.output = result.output;
    let needed = if result.status == HealthStatus::Passing {
        check.config.success_before_passing
    } else {
        check.config.failures_before_critical
    };
    if check.streak >= needed && check.status != result.status {
        check.status = result.status;
        return true;
    }
    false
}

/// Critical when the app has not reported within the TTL.
async fn ttl_watchdog(
    (generation, index): (u64, usize),
    ttl: Duration,
    last: LastReport,
    results: mpsc::Sender<CheckResult>,
    stop: CancellationToken,
) {
    let mut expired_for: Option<Instant> = None;
    let mut ticker = tokio::time::interval((ttl / 4).max(Duration::from_millis(50)));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let reported = *last.lock().unwrap_or_else(|e| e.into_inner());
        if reported.elapsed() >= ttl && expired_for != Some(reported) {
            expired_for = Some(reported);
            let result = probe::ProbeResult {
                status: HealthStatus::Critical,
                output: format!("TTL expired: no report within {}ms", ttl.as_millis()),
            };
            if results.send((generation, index, result)).await.is_err() {
                return;
            }
        }
    }
}

/// One gRPC health check (`grpc.health.v1.Health/Check`).
async fn grpc_probe(addr: &str, service: &str, timeout: Duration) -> probe::ProbeResult {
    use meshwork_proto::grpc_health::HealthCheckRequest;
    use meshwork_proto::grpc_health::health_check_response::ServingStatus;
    use meshwork_proto::grpc_health::health_client::HealthClient;
    let attempt = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map(|r| r.into_inner().status())
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    };
    let critical = |output: String| probe::ProbeResult {
        status: HealthStatus::Critical,
        output,
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(ServingStatus::Serving)) => probe::ProbeResult {
            status: HealthStatus::Passing,
            output: format!("gRPC health {addr}/{service}: SERVING"),
        },
        Ok(Ok(other)) => critical(format!(
            "gRPC health {addr}/{service}: {}",
            other.as_str_name()
        )),
        Ok(Err(e)) => critical(format!("gRPC health {addr}/{service}: {e}")),
        Err(_) => critical(format!(
            "gRPC health {addr}/{service}: timed out after {timeout:?}"
        )),
    }
}

async fn run_probe(
    (generation, index): (u64, usize),
    check: Check,
    results: mpsc::Sender<CheckResult>,
    stop: CancellationToken,
) {
    let definition = CheckDefinition {
        http: match &check.probe {
            Probe::Http(url) => Some(url.clone()),
            _ => None,
        },
        tcp: match &check.probe {
            Probe::Tcp(addr) => Some(addr.clone()),
            _ => None,
        },
        timeout_ms: Some(check.timeout.as_millis() as u64),
        ..CheckDefinition::default()
    };
    // The first run is jittered within a tenth of the interval (at most
    // 1 s), so a fleet restarted together does not probe in lockstep.
    let jitter = (check.interval.as_millis() as u64 / 10).min(1000);
    let first = rand::rng().random_range(0..=jitter);
    tokio::select! {
        () = stop.cancelled() => return,
        () = tokio::time::sleep(Duration::from_millis(first)) => {}
    }
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = match &check.probe {
            Probe::Grpc(addr, service) => grpc_probe(addr, service, check.timeout).await,
            _ => match probe::run(&definition).await {
                Some(result) => result,
                None => return,
            },
        };
        if results.send((generation, index, result)).await.is_err() {
            return;
        }
    }
}

/// Whether `addr` answers a plain HTTP/1.1 request: the registry's REST
/// port given where its gRPC port belongs (a gRPC call there fails with a
/// bare "transport error").
async fn answers_http1(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let wait = Duration::from_secs(1);
    let Ok(Ok(mut stream)) = tokio::time::timeout(wait, tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if stream
        .write_all(b"GET /v1/status/leader HTTP/1.0\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 7];
    matches!(
        tokio::time::timeout(wait, stream.read_exact(&mut head)).await,
        Ok(Ok(_))
    ) && &head == b"HTTP/1."
}

fn note_success(status: &SharedStatus, registry: &Registry) {
    let mut s = lock(status);
    s.registry = Some(registry.current());
    s.last_contact_unix = Some(crate::telemetry::unix_secs());
    s.last_error = None;
}

fn note_failure(status: &SharedStatus, registry: &mut Registry, what: &str, error: &str) {
    let server = registry.current();
    tracing::warn!(registry = %server, error, "{what} failed; trying the next registry server");
    lock(status).last_error = Some(format!("{what} via {server}: {error}"));
    registry.fail_over();
}

/// The service meta sent to the registry: the file's, plus
/// [`INBOUND_PORT_META`] when the sidecar has an inbound listener, which
/// tells other sidecars to dial that port instead of the app's.
fn service_meta(config: &Config) -> std::collections::HashMap<String, String> {
    let mut meta: std::collections::HashMap<String, String> =
        config.meta.clone().into_iter().collect();
    if let Some(inbound) = &config.inbound {
        meta.insert(
            INBOUND_PORT_META.to_owned(),
            inbound.listen.port().to_string(),
        );
    }
    meta
}

fn register_request(config: &Config, checks: &[LocalCheck]) -> RegisterRequest {
    RegisterRequest {
        node: config.node.clone(),
        node_address: config.node_address.clone(),
        node_meta: Default::default(),
        service: Some(AgentService {
            id: config.service_id.clone(),
            name: config.service_name.clone(),
            address: config.service_address.clone(),
            port: u32::from(config.port),
            tags: config.tags.clone(),
            meta: service_meta(config),
            weight_passing: 0,
            weight_warning: 0,
            kind: if config.gateway.is_some() {
                crate::gateway::KIND.to_owned()
            } else {
                String::new()
            },
        }),
        checks: checks
            .iter()
            .map(|c| AgentCheck {
                check_id: c.config.id.clone(),
                name: c.config.name.clone(),
                status: wire(c.status),
                output: c.output.clone(),
                target: c.config.probe.target(),
                interval_ms: c.config.interval.as_millis() as u64,
                deregister_critical_after_ms: c
                    .config
                    .deregister_critical_after
                    .map_or(0, |d| d.as_millis() as u64),
            })
            .collect(),
        session_ttl_ms: config.session_ttl.as_millis() as u64,
        deregister_critical_after_ms: config
            .deregister_critical_after
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// Registers, retrying with capped, jittered backoff across the servers.
/// False when shut down first.
async fn register_until_done(
    config: &Config,
    registry: &mut Registry,
    checks: &[LocalCheck],
    status: &SharedStatus,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    // Addresses already found to answer HTTP/1.1 (said once each).
    let mut rest_ports: Vec<String> = Vec::new();
    loop {
        let request = register_request(config, checks);
        let attempt = registry
            .call(|mut c| async move { c.register(request).await })
            .await;
        match attempt {
            Ok(reply) => {
                tracing::info!(registry = %registry.current(), index = reply.index, service = %config.service_id, "registered");
                note_success(status, registry);
                lock(status).registered = true;
                return true;
            }
            Err(e) => {
                let server = registry.current();
                note_failure(status, registry, "register", &e);
                if e.contains("transport error")
                    && !rest_ports.contains(&server)
                    && answers_http1(&server).await
                {
                    let why = format!(
                        "{server} answers HTTP/1.1, not gRPC: registry.addresses lists the \
                         registry's gRPC ports (8502 by default), not its REST port (8500)"
                    );
                    tracing::error!(registry = %server, "{why}");
                    lock(status).last_error = Some(why);
                    rest_ports.push(server);
                }
            }
        }
        let wait = backoff.next_wait();
        tracing::warn!(
            retry_in_ms = wait.as_millis() as u64,
            "no registry server accepted the registration yet"
        );
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

enum Renewal {
    Alive,
    Lost,
    Failed,
}

/// One heartbeat, with one immediate retry on the next server.
async fn renew(config: &Config, registry: &mut Registry, status: &SharedStatus) -> Renewal {
    for _ in 0..2 {
        let request = HeartbeatRequest {
            node: config.node.clone(),
            service_id: config.service_id.clone(),
        };
        let attempt = registry
            .call(|mut c| async move { c.heartbeat(request).await })
            .await;
        match attempt {
            Ok(reply) => {
                note_success(status, registry);
                return if reply.registered {
                    Renewal::Alive
                } else {
                    Renewal::Lost
                };
            }
            Err(e) => note_failure(status, registry, "heartbeat", &e),
        }
    }
    Renewal::Failed
}

/// Sends every unreported status change (kept for the next try on failure).
async fn report(
    config: &Config,
    registry: &mut Registry,
    checks: &mut [LocalCheck],
    status: &SharedStatus,
) {
    for check in checks.iter_mut().filter(|c| !c.reported) {
        let request = UpdateCheckRequest {
            node: config.node.clone(),
            check_id: check.config.id.clone(),
            status: wire(check.status),
            output: check.output.clone(),
        };
        let attempt = registry
            .call(|mut c| async move { c.update_check(request).await })
            .await;
        match attempt {
            Ok(_) => {
                check.reported = true;
                note_success(status, registry);
            }
            Err(e) => {
                note_failure(status, registry, "check update", &e);
                return;
            }
        }
    }
}

/// The registry takes at most 16 refusals of at most 1 KiB each: the
/// first 16, each reason cut short at a character boundary.
fn bounded(
    mut refused: Vec<meshwork_proto::v1::RefusedEntry>,
) -> Vec<meshwork_proto::v1::RefusedEntry> {
    const MAX: usize = 16;
    const TEXT: usize = 1000;
    refused.truncate(MAX);
    for r in &mut refused {
        for text in [&mut r.scope, &mut r.reason] {
            if text.len() > TEXT {
                let mut end = TEXT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push('…');
            }
            // Control characters are refused by the registry (a reason
            // quotes entry text): shown as spaces.
            if text.chars().any(|c| c.is_control() && c != '\n') {
                *text = text
                    .chars()
                    .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
                    .collect();
            }
        }
    }
    refused
}

/// The proxy's traffic counts per edge, read at each report.
pub type Traffic = Arc<dyn Fn() -> Vec<meshwork_proto::v1::TrafficEdge> + Send + Sync>;

/// Sends what the policy has applied (`Agent.ReportApplied`); a failure
/// is noted and the next change or tick sends it again.
async fn report_applied(
    config: &Config,
    registry: &mut Registry,
    status: &SharedStatus,
    (applied, limits, traffic): (&AppliedConfig, &RateLimits, &Traffic),
) {
    let summary = applied.summary();
    let quota = limits.quota().is_some();
    let request = SidecarReport {
        node: config.node.clone(),
        service_id: config.service_id.clone(),
        service: config.service_name.clone(),
        // The registry fills it in from the catalog.
        address: String::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: if config.gateway.is_some() {
            "gateway"
        } else {
            "sidecar"
        }
        .to_owned(),
        applied: summary.applied.into_iter().collect(),
        refused: bounded(summary.refused),
        config_digest: config.digest.clone(),
        config_loaded_unix: lock(status).config.loaded_unix.unwrap_or(0),
        quota,
        quota_demand_rps: if quota { limits.take_demand() } else { 0.0 },
        traffic: traffic(),
    };
    let mut client = match registry.client().await {
        Ok(client) => client,
        Err(e) => return note_failure(status, registry, "applied-config report", &e),
    };
    match client.report_applied(request).await {
        Ok(reply) => {
            if let Some(share) = reply.into_inner().quota_share_rps {
                limits.set_quota_share(share);
            }
            note_success(status, registry);
        }
        // A server of an older version (during an upgrade), or one that
        // does not have the instance yet: not a reason to leave it; the
        // next tick tries again.
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unimplemented | tonic::Code::FailedPrecondition
            ) =>
        {
            tracing::debug!(registry = %registry.current(), error = %s.message(), "applied-config report not taken");
        }
        Err(s) => note_failure(
            status,
            registry,
            "applied-config report",
            &format!("{}: {}", s.code(), s.message()),
        ),
    }
}

/// Deregisters before exit, trying each server once.
/// True once a server has deregistered the instance.
async fn deregister(config: &Config, registry: &mut Registry, status: &SharedStatus) -> bool {
    for _ in 0..registry.addresses.len() {
        let request = DeregisterRequest {
            node: config.node.clone(),
            service_id: config.service_id.clone(),
        };
        let attempt = registry
            .call(|mut c| async move { c.deregister(request).await })
            .await;
        match attempt {
            Ok(_) => {
                tracing::info!(service = %config.service_id, "deregistered");
                return true;
            }
            Err(e) => note_failure(status, registry, "deregister", &e),
        }
    }
    tracing::error!(
        "could not deregister from any registry server; the session will expire instead"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(service_id: &str, checks: &[&str]) -> Config {
        let mut text = format!(
            "[registry]\naddresses = [\"127.0.0.1:8502\"]\n[service]\nname = \"web\"\nid = \"{service_id}\"\nport = 8080\n"
        );
        for target in checks {
            text.push_str(&format!(
                "[[service.checks]]\ntcp = \"{target}\"\ninterval = \"1s\"\n"
            ));
        }
        Config::parse("t.toml", &text).expect("valid")
    }

    fn statuses(checks: &[LocalCheck]) -> Vec<(String, HealthStatus)> {
        checks
            .iter()
            .map(|c| (c.config.id.clone(), c.status))
            .collect()
    }

    /// A reload keeps a check's status while it probes the same thing:
    /// under its id, or under a new one at the same place (default ids
    /// follow the service id, so a renamed instance keeps its health).
    #[test]
    fn refusals_are_cut_to_what_the_registry_takes() {
        let long = meshwork_proto::v1::RefusedEntry {
            scope: "upstream api".into(),
            reason: format!("é{}\tx", "y".repeat(3000)),
            index: 7,
        };
        let cut = bounded(vec![long; 40]);
        assert_eq!(cut.len(), 16);
        assert!(cut[0].reason.len() <= 1003, "{}", cut[0].reason.len());
        assert!(cut[0].reason.starts_with('é') && cut[0].reason.ends_with('…'));
        let tab = bounded(vec![meshwork_proto::v1::RefusedEntry {
            scope: "s".into(),
            reason: "a\tb".into(),
            index: 1,
        }]);
        assert_eq!(tab[0].reason, "a b");
    }

    #[test]
    fn checks_keep_their_status_across_a_reload_even_renamed() {
        let mut checks = local_checks(
            &config("web-1", &["127.0.0.1:1", "127.0.0.1:2"]),
            Vec::new(),
        );
        for c in &mut checks {
            c.status = HealthStatus::Passing;
        }
        let same = local_checks(&config("web-1", &["127.0.0.1:1", "127.0.0.1:2"]), checks);
        let passing = HealthStatus::Passing;
        assert_eq!(
            statuses(&same),
            [
                ("web-1:check-1".into(), passing),
                ("web-1:check-2".into(), passing)
            ]
        );
        let renamed = local_checks(&config("web-2", &["127.0.0.1:1", "127.0.0.1:3"]), same);
        assert_eq!(
            statuses(&renamed),
            [
                ("web-2:check-1".into(), passing),
                ("web-2:check-2".into(), HealthStatus::Critical)
            ],
            "the renamed check probing the same target keeps its status; a new target starts over"
        );
        // Moved to another place under a new id: starts over.
        let moved = local_checks(&config("web-3", &["127.0.0.1:4", "127.0.0.1:1"]), renamed);
        assert_eq!(
            statuses(&moved),
            [
                ("web-3:check-1".into(), HealthStatus::Critical),
                ("web-3:check-2".into(), HealthStatus::Critical)
            ]
        );
    }
}
