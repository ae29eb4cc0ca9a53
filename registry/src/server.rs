//! Starts one registry server: opens the data dir, builds the Raft node,
//! serves every listener, bootstraps or joins the cluster, and shuts it
//! all down in order when the token is cancelled.
//!
//! `run` takes already-bound listeners so that tests can bind port 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshwork_proto::v1::raft_internal_server::RaftInternalServer;
use meshwork_proto::v1::registry_server::RegistryServer;
use meshwork_proto::v1::{JoinRequest, ReadIndexRequest};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::grpc::RegistryService;
use crate::api::http::{self, AppState};
use crate::cluster::RegistryNode;
use crate::cluster::forward::InternalService;
use crate::command::Command;
use crate::config::{Bootstrap, Config};
use crate::raft::identity::{ClusterIdentity, FOREIGN_CLUSTER};
use crate::raft::log_store::LogStore;
use crate::raft::network::{MAX_INTERNAL_MESSAGE, NetworkFactory, PeerChannels};
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{Raft, TypeConfig};
use crate::storage::datadir::{DataDir, DataDirError};

/// How long in-flight requests get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bound sockets, one per interface.
#[derive(Debug)]
pub struct Listeners {
    /// `None`: that listener is off in the config.
    pub http: Option<TcpListener>,
    pub grpc: Option<TcpListener>,
    pub https: Option<TcpListener>,
    pub grpc_tls: Option<TcpListener>,
    pub raft: TcpListener,
    pub dns_udp: tokio::net::UdpSocket,
    pub dns_tcp: TcpListener,
}

impl Listeners {
    /// Binds every address the config names.
    pub async fn bind(config: &Config) -> Result<Self, BindError> {
        async fn tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
            TcpListener::bind(addr).await.map_err(|source| BindError {
                what,
                flag: what,
                addr,
                source,
            })
        }
        async fn maybe(
            what: &'static str,
            addr: Option<SocketAddr>,
        ) -> Result<Option<TcpListener>, BindError> {
            match addr {
                Some(addr) => tcp(what, addr).await.map(Some),
                None => Ok(None),
            }
        }
        let http = maybe("http", config.http_addr).await?;
        let grpc = maybe("grpc", config.grpc_addr).await?;
        let https = maybe("https", config.https_addr).await?;
        let grpc_tls = maybe("grpc-tls", config.grpc_tls_addr).await?;
        let raft = tcp("raft", config.raft_addr).await?;
        let dns_udp = tokio::net::UdpSocket::bind(config.dns_addr)
            .await
            .map_err(|source| BindError {
                what: "dns (udp)",
                flag: "dns",
                addr: config.dns_addr,
                source,
            })?;
        Ok(Listeners {
            http,
            grpc,
            https,
            grpc_tls,
            raft,
            dns_udp,
            dns_tcp: tcp("dns", config.dns_addr).await?,
        })
    }
}

/// An address that could not be listened on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {what} on {addr}: {source} (pick another address with --{flag}-addr)")]
pub struct BindError {
    what: &'static str,
    flag: &'static str,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("data dir {path} cannot be loaded: {reason}")]
    Storage { path: String, reason: String },
    #[error("invalid Raft settings: {0}")]
    RaftConfig(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot start Raft: {0}")]
    Raft(String),
    #[error("{0} server failed: {1}")]
    Serve(&'static str, String),
    #[error("data dir belongs to another cluster: {0}")]
    ForeignCluster(String),
    /// The consensus core stopped (a storage write failed: a full disk,
    /// an I/O error). The process exits rather than go on answering with
    /// a core that will never move again; the service manager restarts it,
    /// and it recovers from its data dir once the cause is gone.
    #[error(
        "the Raft core stopped ({0}); exiting so that the service manager restarts this server (free disk space in the data dir if it is full)"
    )]
    RaftStopped(String),
}

impl ServerError {
    /// The server refused to start on its data dir (wrong node, foreign,
    /// damaged, unreadable): starting it again changes nothing, so it
    /// exits with its own code, which the unit does not restart on.
    pub fn is_data_refusal(&self) -> bool {
        matches!(self, ServerError::DataDir(_) | ServerError::Storage { .. })
    }
}

/// Runs a registry server until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    data_dir: &std::path::Path,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    // TLS material first: a bad file stops the start before anything else.
    let tls = match &config.tls {
        Some(settings) => Some(Arc::new(crate::tls::Tls::load(settings.clone())?)),
        None => None,
    };
    let dir = Arc::new(DataDir::open(data_dir, config.node_id)?);
    let (raft, node) = start_consensus(&config, &dir, tls.clone()).await?;

    let mut tasks: JoinSet<Result<(), ServerError>> = JoinSet::new();
    // What the sidecars connected here report (in memory).
    let sidecars = Arc::new(crate::telemetry::sidecars::Sidecars::default());

    // Internal gRPC: Raft RPCs and forwarding, on the Raft address; with
    // TLS, mutual TLS only (a server the CA did not sign cannot join, vote
    // or receive entries).
    let internal = RaftInternalServer::new(InternalService::new(
        Arc::clone(&node),
        Arc::clone(&sidecars),
        config.node_name.clone(),
    ))
    .max_decoding_message_size(MAX_INTERNAL_MESSAGE)
    .max_encoding_message_size(MAX_INTERNAL_MESSAGE);
    let internal_tls = match &tls {
        Some(tls) => Some(tls.server_config(true, b"h2")?),
        None => None,
    };
    let token = shutdown.clone();
    tasks.spawn(
        async move {
            // TCP_NODELAY is set on every accepted socket: without it Nagle
            // + delayed ACK stall small replies for 40 ms.
            tonic::transport::Server::builder()
                .add_service(internal)
                .serve_with_incoming_shutdown(
                    crate::tls::io::incoming(listeners.raft, internal_tls, "raft", token.clone()),
                    token.cancelled_owned(),
                )
                .await
                .map_err(|e| ServerError::Serve("raft", e.to_string()))
        }
        .instrument(tracing::info_span!("raft_server")),
    );
    if let Some(tls) = &tls {
        tasks.spawn(reload_tls_on_sighup(Arc::clone(tls), shutdown.clone()));
    }

    tasks.spawn({
        let (node, ttl, token) = (Arc::clone(&node), config.tombstone_ttl, shutdown.clone());
        async move {
            crate::leader::gc::run(node, ttl, token).await;
            Ok(())
        }
        .instrument(tracing::info_span!("tombstone_gc"))
    });

    tasks.spawn({
        let (node, settings, token) = (Arc::clone(&node), config.connect.clone(), shutdown.clone());
        async move {
            crate::leader::ca::run(node, settings, token).await;
            Ok(())
        }
        .instrument(tracing::info_span!("mesh_ca"))
    });

    // One token resolver (and cache) for REST, gRPC and DNS.
    let acl = Arc::new(crate::auth::Acl::new(config.acl.clone()));
    if acl.enabled() {
        tracing::info!(
            default_policy = ?config.acl.default_policy,
            "ACLs enabled: requests need a token"
        );
    }

    if acl.enabled() {
        tasks.spawn({
            let (node, file, token) = (
                Arc::clone(&node),
                config.acl_bootstrap_file.clone(),
                shutdown.clone(),
            );
            async move {
                crate::leader::acl_bootstrap::run(node, file, token).await;
                Ok(())
            }
            .instrument(tracing::info_span!("acl_bootstrap"))
        });
    }
    let resolver = crate::api::grpc::resolver(Arc::clone(&acl), Arc::clone(&node));
    let (grpc_tls, https_tls) = match &tls {
        Some(tls) => (
            Some(tls.server_config(false, b"h2")?),
            Some(tls.server_config(false, b"http/1.1")?),
        ),
        None => (None, None),
    };
    let grpc_thread = spawn_public_grpc(
        &mut tasks,
        (listeners.grpc, listeners.grpc_tls.zip(grpc_tls)),
        &node,
        &config,
        &shutdown,
        (Arc::clone(&acl), resolver),
        &sidecars,
    )?;
    tasks.spawn({
        let timing = crate::cluster::failover::Timing {
            heartbeat: config.heartbeat,
            lease: config.election_timeout_max(),
            election_timeout: config.election_timeout,
        };
        let watch =
            crate::cluster::failover::watch_leader(Arc::clone(&node), timing, shutdown.clone());
        async move {
            watch.await;
            Ok(())
        }
    });

    // REST.
    let app = http::router(rest_state(&config, &dir, &node, &shutdown, &acl, &sidecars));
    for (listener, tls, span) in [
        (listeners.http, None, tracing::info_span!("http_server")),
        (
            listeners.https,
            https_tls,
            tracing::info_span!("https_server"),
        ),
    ] {
        let Some(listener) = listener else { continue };
        let (app, token) = (app.clone(), shutdown.clone());
        tasks.spawn(
            async move {
                http::serve::serve(listener, app, tls, token).await;
                Ok(())
            }
            .instrument(span),
        );
    }

    // Cluster formation.
    let bootstrap_node = Arc::clone(&node);
    let token = shutdown.clone();
    let bootstrap = config.bootstrap.clone();
    let advertise = config.advertise_addr.clone();
    let dev = config.dev;
    tasks.spawn(
        async move {
            tokio::select! {
                () = token.cancelled() => Ok(()),
                result = form_cluster(&bootstrap_node, bootstrap, advertise, dev) => result,
            }
        }
        .instrument(tracing::info_span!("bootstrap")),
    );

    // Cluster identity: name a new cluster, record the name on disk.
    let identity_node = Arc::clone(&node);
    let identity_dir = Arc::clone(&dir);
    let token = shutdown.clone();
    tasks.spawn(
        async move {
            tokio::select! {
                () = token.cancelled() => Ok(()),
                result = keep_cluster_identity(&identity_node, &identity_dir) => result,
            }
        }
        .instrument(tracing::info_span!("cluster_identity")),
    );

    // DNS, from this server's own state.
    let dns_config = Arc::new(dns_config(&config, &acl)?);
    let dns_state = Arc::clone(&node.state);
    let token = shutdown.clone();
    tasks.spawn(
        async move {
            crate::dns::serve(
                listeners.dns_udp,
                listeners.dns_tcp,
                dns_state,
                dns_config,
                token,
            )
            .await;
            Ok(())
        }
        .instrument(tracing::info_span!("dns")),
    );

    // Snapshots: every interval, if enough entries were applied since the last.
    let snapshot_node = Arc::clone(&node);
    let token = shutdown.clone();
    let (threshold, interval) = (config.snapshot_threshold, config.snapshot_interval);
    tasks.spawn(
        async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = snapshot_when_due(&snapshot_node, threshold, interval) => {}
            }
            Ok(())
        }
        .instrument(tracing::info_span!("snapshots")),
    );

    // Leader duties: health checks, TTLs, deregistration of critical instances.
    let health_node = Arc::clone(&node);
    let token = shutdown.clone();
    tasks.spawn(
        async move {
            crate::leader::health::supervise(health_node, token).await;
            Ok(())
        }
        .instrument(tracing::info_span!("health")),
    );
    // A stopped consensus core ends the process (see ServerError::RaftStopped).
    let mut raft_metrics = raft.metrics();
    let token = shutdown.clone();
    tasks.spawn(
        async move {
            loop {
                if let Err(fatal) = &raft_metrics.borrow_and_update().running_state {
                    tracing::error!(error = %fatal, "the Raft core stopped");
                    return Err(ServerError::RaftStopped(fatal.to_string()));
                }
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    changed = raft_metrics.changed() => if changed.is_err() {
                        // The core is gone: only at shutdown is that expected.
                        if token.is_cancelled() {
                            return Ok(());
                        }
                        return Err(ServerError::RaftStopped("its metrics channel closed".into()));
                    },
                }
            }
        }
        .instrument(tracing::info_span!("raft_watchdog")),
    );
    let ttl_node = Arc::clone(&node);
    let token = shutdown.clone();
    tasks.spawn(
        async move {
            crate::leader::session_ttl::supervise(ttl_node, token).await;
            Ok(())
        }
        .instrument(tracing::info_span!("session_ttl")),
    );

    tracing::info!(node = config.node_id, "registry server started");
    meshwork_core::notify::ready(&format!(
        "serving as server {} (REST {}, DNS {}, gRPC {})",
        config.node_id,
        listen_text(config.http_addr.or(config.https_addr)),
        config.dns_addr,
        listen_text(config.grpc_addr.or(config.grpc_tls_addr))
    ));

    let failure = serve_until_stopped(&mut tasks, &shutdown).await;
    drain(tasks).await;
    // The public gRPC thread ends by itself within the same grace; joined
    // so that its listener and connections are gone when `run` returns.
    let _ = tokio::task::spawn_blocking(move || grpc_thread.join()).await;
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown failed");
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The public gRPC listeners: plain, and TLS with its configuration.
type PublicListeners = (
    Option<TcpListener>,
    Option<(TcpListener, Arc<rustls::ServerConfig>)>,
);

/// The public gRPC server (watch, agent, registry status) and the watch
/// hub, on a thread of their own (see below); the thread's result joins
/// `tasks`, its handle is returned so shutdown can wait for it.
fn spawn_public_grpc(
    tasks: &mut JoinSet<Result<(), ServerError>>,
    (plain, tls): PublicListeners,
    node: &Arc<RegistryNode>,
    config: &Config,
    shutdown: &CancellationToken,
    (acl, resolver): (Arc<crate::auth::Acl>, crate::api::grpc::Resolver),
    sidecars: &Arc<crate::telemetry::sidecars::Sidecars>,
) -> Result<std::thread::JoinHandle<()>, ServerError> {
    let public = RegistryServer::new(RegistryService {
        node: Arc::clone(node),
    });
    // The hub's task runs on the public gRPC server's thread (below).
    let hub = crate::watch::Hub::new(Arc::clone(&node.state), config.watch.clone());
    let mut watch = crate::api::grpc::watch::WatchServer::new(Arc::clone(&hub), shutdown.clone())
        .with_resolver(Arc::clone(&resolver))
        .with_default_intention(config.connect.default_intention_allow);
    if config.connect.enabled {
        watch = watch.with_leaf_signer(crate::api::grpc::leaf_watch::LeafSigner {
            acl: Arc::clone(&acl),
            node: Arc::clone(node),
            datacenter: config.datacenter.clone().into(),
        });
    }
    let (sessions, forward_sessions) =
        crate::leader::liveness::Sessions::new(Arc::clone(node), shutdown.clone());
    tasks.spawn(
        async move {
            forward_sessions.await;
            Ok(())
        }
        .instrument(tracing::info_span!("sessions")),
    );
    let agent =
        meshwork_proto::v1::agent_server::AgentServer::new(crate::api::grpc::agent::AgentService {
            node: Arc::clone(node),
            sessions,
            resolver,
            acl,
            datacenter: config.datacenter.clone().into(),
            connect_enabled: config.connect.enabled,
            sidecars: Arc::clone(sidecars),
            peers: Arc::default(),
        });
    // The public gRPC server and the watch hub's task run on a thread of
    // their own with a single-threaded runtime. A watch change wakes every
    // subscriber's stream task at once, from the same thread, so they go
    // into its local run queue in order; each queues its DATA frame and
    // wakes its connection's task, which is queued behind them and then
    // writes all of its frames in one syscall. On the multi-threaded
    // runtime the connection task, woken by the first stream, takes the
    // worker's LIFO slot and runs right after every single stream (and
    // tasks woken from another thread arrive through the injection queue,
    // one at a time): one write(2) per subscriber, most of the cost of a
    // fan-out.
    let token = shutdown.clone();
    let to_std = |l: TcpListener| {
        l.into_std()
            .map_err(|e| ServerError::Serve("grpc", e.to_string()))
    };
    let grpc_listener = (
        plain.map(to_std).transpose()?,
        match tls {
            Some((l, config)) => Some((to_std(l)?, config)),
            None => None,
        },
    );
    let (grpc_done, grpc_result) = tokio::sync::oneshot::channel();
    let span = tracing::info_span!("grpc_server");
    let grpc_thread = std::thread::Builder::new()
        .name("grpc-public".into())
        .spawn(move || {
            let _ = grpc_done.send(serve_public_grpc(
                grpc_listener,
                hub,
                public,
                watch,
                agent,
                token,
                span,
            ));
        })
        .map_err(|e| ServerError::Serve("grpc", e.to_string()))?;
    tasks.spawn(async move {
        grpc_result
            .await
            .unwrap_or_else(|_| Err(ServerError::Serve("grpc", "server thread died".into())))
    });
    Ok(grpc_thread)
}

fn listen_text(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
}

/// SIGHUP: reads the TLS files again; new handshakes use them, open
/// connections keep theirs. A failed reload keeps the old ones.
async fn reload_tls_on_sighup(
    tls: Arc<crate::tls::Tls>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP: TLS files will not be reloaded");
        return Ok(());
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            got = hangup.recv() => if got.is_none() { return Ok(()) },
        }
        match tls.reload() {
            Ok(()) => tracing::warn!("TLS certificate, key and CA reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed: the running certificates stay")
            }
        }
    }
}

/// Opens the log and the state machine in `dir` and starts Raft on them.
async fn start_consensus(
    config: &Config,
    dir: &DataDir,
    tls: Option<Arc<crate::tls::Tls>>,
) -> Result<(Raft, Arc<RegistryNode>), ServerError> {
    let identity = Arc::new(ClusterIdentity::new(dir.cluster_id.clone()));
    let storage_error = |e: &dyn std::fmt::Display| ServerError::Storage {
        path: dir.path.display().to_string(),
        reason: e.to_string(),
    };
    let wal = dir.path.join(crate::storage::datadir::WAL_DIR);
    let log_store = LogStore::open(&dir.meta_file, &wal).map_err(|e| {
        if !e.is_damage() {
            return storage_error(&e);
        }
        // The way out, explicit and the operator's to take.
        let hint = crate::storage::datadir::rebuild_hint(&dir.path);
        storage_error(&format!("{e}\n  {hint}"))
    })?;
    // A server joining a running cluster with no vote recorded waits for a
    // leader before it votes (see `RegistryNode::withhold_votes_until_leader`);
    // servers forming a cluster with `--peers` must vote for each other.
    let withhold_votes = !log_store.has_vote() && !matches!(config.bootstrap, Bootstrap::Peers(_));
    let state_machine =
        StateMachineStore::open(&dir.path.join(crate::storage::datadir::SNAPSHOT_DIR))
            .map_err(|e| storage_error(&e))?;
    let shared = state_machine.shared();

    let raft_config = openraft::Config {
        cluster_name: "meshwork".into(),
        heartbeat_interval: config.heartbeat.as_millis() as u64,
        election_timeout_min: config.election_timeout.as_millis() as u64,
        election_timeout_max: config.election_timeout_max().as_millis() as u64,
        // Snapshots are triggered by `snapshot_when_due`, at most once per
        // interval (as Consul's snapshot_interval), not on every threshold
        // crossing: at high write rates a large state would otherwise be
        // rewritten every few seconds.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: config.snapshot_trailing_logs,
        max_payload_entries: 256,
        install_snapshot_timeout: 30_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ServerError::RaftConfig(e.to_string()))?;

    let network = NetworkFactory {
        channels: PeerChannels::new(
            identity,
            Arc::new(crate::raft::directory::Directory::new(
                config.node_id,
                config.node_name.clone(),
            )),
            tls,
        ),
    };
    let channels = network.channels.clone();
    let raft: Raft = openraft::Raft::<TypeConfig>::new(
        config.node_id,
        Arc::new(raft_config),
        network,
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| storage_error(&e))?;
    let node = Arc::new(RegistryNode::new(
        config.node_id,
        raft.clone(),
        shared,
        channels,
        config.leader_wait,
        config.election_timeout,
    ));
    if withhold_votes {
        node.withhold_votes_until_leader();
    }
    Ok((raft, node))
}

/// What every REST handler shares.
fn rest_state(
    config: &Config,
    dir: &DataDir,
    node: &Arc<RegistryNode>,
    shutdown: &CancellationToken,
    acl: &Arc<crate::auth::Acl>,
    sidecars: &Arc<crate::telemetry::sidecars::Sidecars>,
) -> AppState {
    AppState {
        node: Arc::clone(node),
        shutdown: shutdown.clone(),
        node_name: config.node_name.clone().into(),
        node_uuid: dir.node_uuid.clone().into(),
        node_raft_addr: config.advertise_addr.clone(),
        agent_address: config
            .advertise_addr
            .rsplit_once(':')
            .map_or(config.advertise_addr.as_str(), |(host, _)| host)
            .trim_matches(|c| c == '[' || c == ']')
            .into(),
        datacenter: config.datacenter.clone().into(),
        shared_reads: Arc::default(),
        waiters: http::waiters::Waiters::start(Arc::clone(&node.state), shutdown.clone()),
        data_dir: Arc::from(dir.path.as_path()),
        acl: Arc::clone(acl),
        leaves: Arc::default(),
        default_intention_allow: config.connect.default_intention_allow,
        sidecars: Arc::clone(sidecars),
    }
}

/// The DNS server's settings, from the config.
fn dns_config(
    config: &Config,
    acl: &Arc<crate::auth::Acl>,
) -> Result<crate::dns::DnsConfig, ServerError> {
    Ok(crate::dns::DnsConfig {
        domain: hickory_proto::rr::Name::from_ascii(&config.dns.domain)
            .map_err(|e| ServerError::RaftConfig(format!("dns domain: {e}")))?,
        datacenter: config.datacenter.clone(),
        service_ttl: config.dns.service_ttl.clone().into_iter().collect(),
        node_ttl: config.dns.node_ttl,
        only_passing: config.dns.only_passing,
        a_record_limit: config.dns.a_record_limit,
        recursors: config.dns.recursors.clone(),
        ns_addr: config
            .advertise_addr
            .rsplit_once(':')
            .and_then(|(host, _)| host.trim_matches(|c| c == '[' || c == ']').parse().ok()),
        acl: Some(Arc::clone(acl)),
    })
}

/// Waits until `shutdown` is cancelled or a task fails (which stops the
/// server); returns the failure, and cancels `shutdown` either way.
async fn serve_until_stopped(
    tasks: &mut JoinSet<Result<(), ServerError>>,
    shutdown: &CancellationToken,
) -> Option<ServerError> {
    let failure = loop {
        tokio::select! {
            () = shutdown.cancelled() => break None,
            joined = tasks.join_next() => match joined {
                Some(Ok(Ok(()))) => continue,
                Some(Ok(Err(e))) => break Some(e),
                Some(Err(e)) => break Some(ServerError::Serve("task", e.to_string())),
                None => {
                    shutdown.cancelled().await;
                    break None;
                }
            },
        }
    };
    shutdown.cancel();
    failure
}

/// Lets the tasks finish for [`SHUTDOWN_GRACE`], then aborts the rest.
async fn drain(mut tasks: JoinSet<Result<(), ServerError>>) {
    tracing::info!("shutting down");
    meshwork_core::notify::stopping();
    let drain = async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Err(e)) = joined {
                tracing::warn!(error = %e, "task failed during shutdown");
            }
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!("grace period over, aborting remaining tasks");
        tasks.abort_all();
    }
}

/// Serves the public gRPC port and runs the watch hub on the calling
/// thread (see `run`) until `shutdown`, plus the grace period for open calls.
fn serve_public_grpc(
    (plain, tls): (
        Option<std::net::TcpListener>,
        Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    ),
    hub: Arc<crate::watch::Hub>,
    public: RegistryServer<RegistryService>,
    watch: crate::api::grpc::watch::WatchServer,
    agent: meshwork_proto::v1::agent_server::AgentServer<crate::api::grpc::agent::AgentService>,
    shutdown: CancellationToken,
    span: tracing::Span,
) -> Result<(), ServerError> {
    let serve_error = |e: &dyn std::fmt::Display| ServerError::Serve("grpc", e.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| serve_error(&e))?;
    runtime.block_on(
        async move {
            // The plain and the TLS listener feed one server.
            let plain = plain
                .map(TcpListener::from_std)
                .transpose()
                .map_err(|e| serve_error(&e))?
                .map(|l| crate::tls::io::incoming(l, None, "grpc", shutdown.clone()));
            let tls = match tls {
                Some((l, config)) => Some(crate::tls::io::incoming(
                    TcpListener::from_std(l).map_err(|e| serve_error(&e))?,
                    Some(config),
                    "grpc-tls",
                    shutdown.clone(),
                )),
                None => None,
            };
            let incoming = futures::stream::select(
                futures::StreamExt::flatten(futures::stream::iter(plain)),
                futures::StreamExt::flatten(futures::stream::iter(tls)),
            );
            tokio::spawn(
                hub.run(shutdown.clone())
                    .instrument(tracing::info_span!("watch_hub")),
            );
            let serve = tonic::transport::Server::builder()
                .layer(crate::api::grpc::metrics::GrpcMetricsLayer)
                .layer(crate::api::grpc::watch::WatchLayer::new(watch))
                .add_service(public)
                .add_service(agent)
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
            tokio::select! {
                served = serve => served.map_err(|e| serve_error(&e)),
                // Past the grace `run` gives every task, drop what is left.
                () = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => Ok(()),
            }
        }
        .instrument(span),
    )
}

/// Bootstraps a new cluster, joins a running one, or does nothing when
/// the data dir already holds a configuration.
async fn form_cluster(
    node: &RegistryNode,
    bootstrap: Bootstrap,
    advertise: String,
    dev: bool,
) -> Result<(), ServerError> {
    let initialized = node
        .raft
        .is_initialized()
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    if initialized {
        tracing::info!("restarting with the cluster configuration in the data dir");
        return check_same_cluster(node, &bootstrap, dev).await;
    }
    match bootstrap {
        Bootstrap::None => {
            tracing::warn!(
                "empty data dir and neither --peers nor --join: waiting for a leader to add this server"
            );
            Ok(())
        }
        Bootstrap::Peers(peers) => {
            let members: BTreeMap<u64, BasicNode> = peers
                .into_iter()
                .map(|(id, addr)| (id, BasicNode::new(addr)))
                .collect();
            tracing::info!(servers = members.len(), "forming a new cluster");
            node.bootstrap(members)
                .await
                .map_err(|e| ServerError::Raft(e.to_string()))
        }
        Bootstrap::Join(target) => {
            let mut delay = Duration::from_millis(200);
            loop {
                match join_once(node, &target, &advertise).await {
                    Ok(()) => {
                        tracing::info!(via = %target, "joined the cluster");
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(via = %target, error = %e, retry_in = ?delay, "join failed");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

async fn join_once(node: &RegistryNode, target: &str, advertise: &str) -> Result<(), String> {
    let mut client = node.channels.client(target).map_err(|e| e.to_string())?;
    let mut request = node.channels.request(JoinRequest {
        node_id: node.id,
        raft_addr: advertise.to_owned(),
    });
    request.set_timeout(Duration::from_secs(120));
    let reply = client
        .join(request)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    if reply.error.is_empty() {
        Ok(())
    } else {
        Err(reply.error)
    }
}

/// On restart: refuses a data dir whose Raft configuration shares no
/// server with `--peers`, or whose peers answer with another cluster id.
async fn check_same_cluster(
    node: &RegistryNode,
    bootstrap: &Bootstrap,
    dev: bool,
) -> Result<(), ServerError> {
    let mut metrics = node.raft.metrics();
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        metrics.wait_for(|m| m.membership_config.membership().nodes().next().is_some()),
    )
    .await;
    let members = node.members();
    if let Bootstrap::Peers(peers) = bootstrap
        && !dev
        && !members.is_empty()
        && !peers
            .iter()
            .any(|(_, addr)| members.iter().any(|m| m.raft_addr == *addr))
    {
        let stored: Vec<String> = members
            .iter()
            .map(|m| format!("{}@{}", m.id, m.raft_addr))
            .collect();
        let wanted: Vec<String> = peers
            .iter()
            .map(|(id, addr)| format!("{id}@{addr}"))
            .collect();
        return Err(ServerError::ForeignCluster(format!(
            "its Raft configuration lists {}, none of which is in --peers {}; point --data-dir at this cluster's data or fix --peers",
            stored.join(","),
            wanted.join(",")
        )));
    }
    for member in members.iter().filter(|m| m.id != node.id) {
        let Ok(mut client) = node.channels.client(&member.raft_addr) else {
            continue;
        };
        let mut request = node.channels.request(ReadIndexRequest {
            linearizable: false,
        });
        request.set_timeout(Duration::from_secs(1));
        if let Err(status) = client.read_index(request).await
            && status.code() == tonic::Code::FailedPrecondition
            && status.message().starts_with(FOREIGN_CLUSTER)
        {
            return Err(ServerError::ForeignCluster(format!(
                "server {} at {} answered: {}",
                member.id,
                member.raft_addr,
                status.message()
            )));
        }
    }
    Ok(())
}

/// Leader duty and bookkeeping for the cluster id: the first leader of a
/// new cluster names it; every server records the name in its data dir.
async fn keep_cluster_identity(node: &RegistryNode, dir: &DataDir) -> Result<(), ServerError> {
    let mut applied = node.state.subscribe();
    let mut metrics = node.raft.metrics();
    let recorded = dir.cluster_id.is_some();
    loop {
        let known = node.state.read().cluster_id.clone();
        match known {
            Some(id) => {
                if !node.channels.identity.learn(&id) {
                    return Err(ServerError::ForeignCluster(format!(
                        "{} records cluster {:?} but its Raft log names cluster {id}",
                        dir.path.display(),
                        node.channels.identity.get().unwrap_or_default()
                    )));
                }
                if !recorded {
                    dir.record_cluster_id(&id)?;
                    tracing::info!(cluster = %id, "cluster id recorded");
                }
                return Ok(());
            }
            None if node.is_leader() => {
                let id = crate::storage::datadir::new_uuid();
                if let Err(e) = node.write(Command::SetClusterId { id }).await {
                    tracing::warn!(error = %e, "could not name the cluster yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
            None => {}
        }
        tokio::select! {
            _ = applied.changed() => {}
            _ = metrics.changed() => {}
        }
    }
}

/// Triggers a snapshot (which then purges the log) whenever `threshold`
/// entries have been applied since the last one, checking every `interval`
/// to twice that, at random (as Consul's Raft library does), so that the
/// servers of a cluster seldom build theirs at the same time.
async fn snapshot_when_due(node: &RegistryNode, threshold: u64, interval: Duration) {
    loop {
        let jitter = interval.mul_f64(rand::random::<f64>());
        tokio::time::sleep(interval + jitter).await;
        let (applied, last_snapshot) = {
            let metrics = node.raft.metrics();
            let m = metrics.borrow();
            (
                m.last_applied.map_or(0, |l| l.index),
                m.snapshot.map_or(0, |l| l.index),
            )
        };
        if applied.saturating_sub(last_snapshot) >= threshold {
            if let Err(e) = node.raft.trigger().snapshot().await {
                tracing::warn!(error = %e, "could not trigger a snapshot");
                return;
            }
            // Give the snapshot time to finish before looking again.
            let mut metrics = node.raft.metrics();
            let _ = tokio::time::timeout(
                Duration::from_secs(60),
                metrics.wait_for(|m| m.snapshot.map_or(0, |l| l.index) > last_snapshot),
            )
            .await;
        }
    }
}
