//! `meshwork-sidecar --config FILE`: the agent that runs next to each
//! service instance. It registers the service with the registry, runs its
//! checks, keeps a heartbeat session and, with `[inbound]` or
//! `[[upstreams]]`, carries the service's traffic. On SIGHUP it reloads
//! its config file (see [`meshwork_sidecar::reload`]); on SIGTERM/SIGINT
//! it deregisters, stops accepting, drains in-flight requests and exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use meshwork_sidecar::discovery::Discovery;
use meshwork_sidecar::listener::Proxy;
use meshwork_sidecar::reload::Reloader;
use meshwork_sidecar::tls::{MeshTls, renew};
use meshwork_sidecar::{admin, agent, config};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// `println!` that a closed stdout does not turn into a panic (as
/// `--check-config | head -1` would, exit 101): what cannot be written is
/// dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// jemalloc rather than glibc's malloc: the proxy allocates and frees a
/// few small blocks per request (header maps, bodies, futures) and
/// jemalloc's thread cache serves those faster.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: a bad command line or configuration.
const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "meshwork-sidecar",
    version,
    about = "Meshwork sidecar: registers a service instance, checks its health and carries its traffic"
)]
struct Cli {
    /// The sidecar's TOML configuration.
    #[arg(long)]
    config: PathBuf,
    /// `text` or `json`.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// tracing filter (RUST_LOG works too).
    #[arg(long)]
    log_level: Option<String>,
    /// Runtime worker threads (the proxy's parallelism).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Validate the config file, print a summary and exit: 0 when valid,
    /// 64 when not (before `systemctl reload`, as `nginx -t`).
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let config = match config::Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("meshwork-sidecar: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if cli.check_config {
        match &config.gateway {
            Some(g) => say!(
                "{}: valid — gateway {} ({}) on node {}, listeners from ingress-gateway {:?}, {} certificate file(s), {} API key(s), admin {}",
                cli.config.display(),
                config.service_id,
                config.service_name,
                config.node,
                g.name,
                g.certificates.len(),
                g.api_keys.len(),
                config.admin
            ),
            None => say!(
                "{}: valid — service {} ({}) on node {}, {} check(s), {} upstream(s){}, admin {}",
                cli.config.display(),
                config.service_id,
                config.service_name,
                config.node,
                config.checks.len(),
                config.upstreams.len(),
                config
                    .inbound
                    .as_ref()
                    .map(|i| format!(", inbound {}", i.listen))
                    .unwrap_or_default(),
                config.admin
            ),
        }
        return ExitCode::SUCCESS;
    }
    if cli.log_format != "text" && cli.log_format != "json" {
        eprintln!("meshwork-sidecar: --log-format must be text or json");
        return ExitCode::from(EX_USAGE);
    }
    // A `trace` that release builds compile out is lowered to `debug` (and
    // said below), so the filter library prints no warning of its own, in
    // colour, to a journal.
    const QUIET: &str = "warn,meshwork_sidecar=info";
    let wanted = cli.log_level.clone().or_else(|| {
        std::env::var(EnvFilter::DEFAULT_ENV)
            .ok()
            .filter(|l| !l.is_empty())
    });
    let (filter, lowered) = match wanted {
        Some(level) => {
            let (level, lowered) = meshwork_core::log_level::within_build(&level);
            match EnvFilter::try_new(&level) {
                Ok(filter) => (filter, lowered),
                Err(_) if cli.log_level.is_some() => (EnvFilter::new(level), lowered),
                Err(_) => (EnvFilter::new(QUIET), false),
            }
        }
        None => (EnvFilter::new(QUIET), false),
    };
    // Colour only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    if lowered {
        tracing::warn!("trace level is compiled out of release builds: logging at debug instead");
    }
    // A small runtime: the agent is mostly idle and one thread carries a
    // service's traffic comfortably; --worker-threads for more.
    // One thread: the current-thread scheduler, which skips the
    // work-stealing machinery a single worker would not use.
    let runtime = if cli.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwork-sidecar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshwork-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: config::Config, config_path: PathBuf) -> anyhow::Result<()> {
    // First: a signal that comes while the sidecar starts (registering can
    // take long with no registry up) is kept for the loop below, and a
    // SIGHUP then is a reload rather than the end of the process.
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another sidecar on this host? each needs its own [admin] listen)"
            } else {
                " (set [admin] listen)"
            };
            anyhow::anyhow!("cannot listen for admin on {}: {e}{hint}", config.admin)
        })?;
    eprintln!(
        "meshwork-sidecar: {} ({}) on node {} via {}; admin on http://{}",
        config.service_id,
        config.service_name,
        config.node,
        config.registry.join(","),
        config.admin
    );
    let shutdown = CancellationToken::new();
    // The proxy's listeners are bound before registering, so peers that
    // see this instance can reach its inbound listener at once. A sidecar
    // without listeners still has an (idle) proxy: a reload may add some.
    let discovery = Discovery::new(
        config.registry.clone(),
        config.registry_token.clone(),
        shutdown.clone(),
    );
    // The mesh identity: a leaf signed by the registry's CA and its roots,
    // kept current by a task of its own; the listeners read it.
    let mesh = MeshTls::new(&config.service_name);
    let mesh_task = tokio::spawn(tracing::Instrument::instrument(
        renew::run(mesh.clone(), discovery.clone(), shutdown.clone()),
        tracing::info_span!("mesh identity"),
    ));
    let proxy = Proxy::bind(&config, discovery.clone(), mesh, shutdown.clone()).await?;
    proxy.run();
    let intentions_task = tokio::spawn(tracing::Instrument::instrument(
        meshwork_sidecar::policy::intentions::run(
            proxy.intentions().clone(),
            config.service_name.clone(),
            discovery.clone(),
            proxy.applied().clone(),
            shutdown.clone(),
        ),
        tracing::info_span!("intentions"),
    ));
    let limits_task = tokio::spawn(tracing::Instrument::instrument(
        meshwork_sidecar::policy::ratelimit::run(
            proxy.limits().clone(),
            config.service_name.clone(),
            discovery.clone(),
            proxy.applied().clone(),
            shutdown.clone(),
        ),
        tracing::info_span!("rate limits"),
    ));
    let status: agent::SharedStatus = Arc::new(Mutex::new(agent::Status::default()));
    let (ttl_reports, results_tx, results) = agent::channels(&config);
    let (configs, agent_configs) = watch::channel(Arc::new(config));
    let defaults_task = tokio::spawn(tracing::Instrument::instrument(
        meshwork_sidecar::policy::defaults::run(
            Arc::clone(&proxy),
            configs.subscribe(),
            discovery.clone(),
            proxy.applied().clone(),
            shutdown.clone(),
        ),
        tracing::info_span!("proxy defaults"),
    ));
    let mut reloader = Reloader::new(
        config_path,
        Arc::clone(&proxy),
        discovery,
        configs,
        Arc::clone(&status),
    );
    let admin_task = tokio::spawn(admin::serve(
        admin,
        Arc::clone(&status),
        ttl_reports.clone(),
        Arc::clone(&proxy),
        shutdown.clone(),
    ));
    let agent_shutdown = CancellationToken::new();
    let agent_task = tokio::spawn({
        let (proxy, agent_shutdown, status) = (
            Arc::clone(&proxy),
            agent_shutdown.clone(),
            Arc::clone(&status),
        );
        async move {
            // An instance is advertised only once its sidecar can take
            // traffic: with a leaf, the roots and (inbound) its intentions.
            // Until then callers would be refused in the handshake.
            if !inbound_can_serve(&proxy, &agent_shutdown).await {
                return;
            }
            agent::run(
                agent_configs,
                status,
                agent_shutdown,
                ttl_reports,
                (results_tx, results),
                (proxy.applied().clone(), proxy.limits().clone(), {
                    let proxy = Arc::clone(&proxy);
                    Arc::new(move || proxy.traffic()) as agent::Traffic
                }),
            )
            .await;
        }
    });

    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = term.recv() => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                // The outcome is logged and shown in /status and /metrics.
                let _ = reloader.reload().await;
            }
        }
    }
    tracing::info!("shutting down: deregistering");
    agent_shutdown.cancel();
    let _ = agent_task.await;
    if proxy.has_listeners() {
        tracing::info!("draining the proxy");
    }
    proxy.drain().await;
    shutdown.cancel();
    let _ = admin_task.await;
    let _ = mesh_task.await;
    let _ = intentions_task.await;
    let _ = limits_task.await;
    let _ = defaults_task.await;
    Ok(())
}

/// Waits until the proxy's inbound listener (if any) can serve mesh
/// traffic; false when `shutdown` came first. Says once why it waits.
async fn inbound_can_serve(proxy: &Proxy, shutdown: &CancellationToken) -> bool {
    let mut said = false;
    loop {
        let waiting = if !proxy.has_inbound() {
            None
        } else if let Some(reason) = proxy.mesh_not_ready() {
            Some(reason.to_string())
        } else if proxy.intentions_pending() {
            Some("no intentions yet".to_owned())
        } else {
            None
        };
        let Some(reason) = waiting else {
            return true;
        };
        if !said {
            tracing::info!(%reason, "registering once the inbound listener can take mesh traffic");
            said = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(std::time::Duration::from_millis(25)) => {}
        }
    }
}
