//! `meshwork-registry`: parses flags, sets up logging, binds the listeners
//! and runs the server until SIGINT or SIGTERM. SIGHUP reloads the
//! configuration file: the log level takes effect at once, the other
//! settings at the next restart.

use std::process::ExitCode;

use clap::Parser;
use meshwork_registry::config::{Cli, Config, DataDir};
use meshwork_registry::server::{self, Listeners, ServerError};
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

/// jemalloc keeps its bookkeeping outside the blocks it hands out, so the
/// 8 KiB buffers hyper gives every connection cost no resident memory until
/// they are written to; with glibc's malloc every block's header page is
/// touched. Measured on a fresh server holding 3,000 parked blocking
/// queries: 16.2 KiB each with glibc, 10.5 KiB with jemalloc (idle
/// keep-alive connections: 11 KiB -> 2.9 KiB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Refused to start on its data dir (see `ServerError::is_data_refusal`).
const EXIT_DATA_REFUSED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let check_only = cli.check_config;
    let config = match Config::load(cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("meshwork-registry: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        say!("meshwork-registry: configuration is valid\n{config:#?}");
        return ExitCode::SUCCESS;
    }
    let reload_log_level = init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwork-registry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, reload_log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshwork-registry: {e}");
            let refused = e
                .downcast_ref::<ServerError>()
                .is_some_and(ServerError::is_data_refusal);
            if refused {
                ExitCode::from(EXIT_DATA_REFUSED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Sets the log filter anew (on SIGHUP).
type ReloadLogLevel = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The log filter: `--log-level` / `log_level`, else `RUST_LOG`, else quiet;
/// true when it asked for `trace`, which release builds compile out (it is
/// lowered to `debug`, and the caller says so through the log).
fn log_filter(config: &Config) -> (EnvFilter, bool) {
    const QUIET: &str = "warn,openraft=error,meshwork_registry=info";
    if let Some(level) = config.log_level.as_deref() {
        let (level, lowered) = meshwork_core::log_level::within_build(level);
        return (EnvFilter::new(level), lowered);
    }
    match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(level) if !level.is_empty() => {
            let (level, lowered) = meshwork_core::log_level::within_build(&level);
            match EnvFilter::try_new(level) {
                Ok(filter) => (filter, lowered),
                Err(_) => (EnvFilter::new(QUIET), false),
            }
        }
        _ => (EnvFilter::new(QUIET), false),
    }
}

/// Says that a `trace` level was lowered (see [`log_filter`]).
fn say_lowered(lowered: bool) {
    if lowered {
        tracing::warn!("trace level is compiled out of release builds: logging at debug instead");
    }
}

fn init_tracing(config: &Config) -> ReloadLogLevel {
    let (filter, lowered) = log_filter(config);
    // Colour only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if config.log_json {
        let builder = builder.json().with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        say_lowered(lowered);
        Box::new(move |filter| handle.reload(filter).map_err(|e| e.to_string()))
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        say_lowered(lowered);
        Box::new(move |filter| handle.reload(filter).map_err(|e| e.to_string()))
    }
}

/// SIGHUP: reads the flags and the configuration file again. A file that
/// no longer parses changes nothing; the log level applies at once.
async fn reload_on_sighup(reload_log_level: ReloadLogLevel) {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: reload is not available");
        return;
    };
    while hangup.recv().await.is_some() {
        match Config::load(Cli::parse()) {
            Err(e) => tracing::error!(error = %e, "reload failed: the running configuration stays"),
            Ok(config) => {
                let (filter, lowered) = log_filter(&config);
                match reload_log_level(filter) {
                    Ok(()) => {
                        tracing::warn!(
                            log_level = config.log_level.as_deref().unwrap_or("default"),
                            "configuration reloaded: the log level applies now, other settings after a restart"
                        );
                        say_lowered(lowered);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload failed: cannot change the log level")
                    }
                }
            }
        }
    }
}

async fn serve(config: Config, reload_log_level: ReloadLogLevel) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config).await?;
    // Dev mode keeps its data in a temp dir that is removed at exit.
    let (data_dir, _temp) = match &config.data_dir {
        DataDir::Path(path) => (path.clone(), None),
        DataDir::Temporary => {
            let temp = tempfile::Builder::new().prefix("meshwork-dev-").tempdir()?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    say!(
        "meshwork-registry {}: node {} ({}){}",
        env!("CARGO_PKG_VERSION"),
        config.node_id,
        config.node_name,
        if config.dev { ", dev mode" } else { "" }
    );
    say!("  data  {}", data_dir.display());
    if let Some(http) = &listeners.http {
        say!("  http  http://{}  (REST API)", http.local_addr()?);
    }
    if let Some(https) = &listeners.https {
        say!(
            "  https https://{}  (REST API over TLS)",
            https.local_addr()?
        );
    }
    if let Some(grpc) = &listeners.grpc {
        say!("  grpc  {}  (public gRPC)", grpc.local_addr()?);
    }
    if let Some(grpc) = &listeners.grpc_tls {
        say!("  grpcs {}  (public gRPC over TLS)", grpc.local_addr()?);
    }
    say!(
        "  raft  {}  (Raft and internal gRPC{}, advertised as {})",
        listeners.raft.local_addr()?,
        if config.tls.is_some() {
            ", mutual TLS"
        } else {
            ""
        },
        config.advertise_addr
    );
    say!(
        "  dns   {}  (UDP and TCP, domain {})",
        listeners.dns_udp.local_addr()?,
        config.dns.domain
    );

    tokio::spawn(tracing::Instrument::instrument(
        reload_on_sighup(reload_log_level),
        tracing::info_span!("reload"),
    ));
    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal_token.cancel();
    });
    server::run(config, &data_dir, listeners, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
