//! The gRPC server: wires the three `tidings.v1` services, health and
//! reflection onto one listener, and drains gracefully on shutdown.

mod admin;
pub(crate) mod auth;
mod convert;
mod deadline;
mod decoding;
mod net;
mod publisher;
mod reload;
mod subscriber;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::broker::{Broker, Limits};
use crate::error::{Error, Result};
use crate::metrics::{Counted, GrpcLayer, Metrics};
use crate::proto::{
    admin_service_server::AdminServiceServer, publisher_service_server::PublisherServiceServer,
    subscriber_service_server::SubscriberServiceServer,
};
use crate::store::{Store, StoreConfig};

pub use net::{ClientAuth, ConnInfo, DEFAULT_MAX_CONNECTIONS, Network, TlsFiles};

/// The names health reports on, besides the overall "".
pub const SERVICE_NAMES: [&str; 3] = [
    "tidings.v1.PublisherService",
    "tidings.v1.SubscriberService",
    "tidings.v1.AdminService",
];

/// Everything `tidings serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Storage.
    pub store: StoreConfig,
    /// Client limits.
    pub limits: Limits,
    /// Largest gRPC request accepted, in bytes (a publish batch included).
    pub max_request_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 ping interval on idle connections.
    pub keepalive_interval: Duration,
    /// How long to wait for a ping's answer before dropping the connection.
    pub keepalive_timeout: Duration,
    /// Streams a client may reset before the connection is refused (guards
    /// against rapid-reset floods).
    pub max_pending_reset_streams: usize,
    /// How long draining waits for clients to finish their calls before the
    /// remaining connections are closed (a health Watch, say, never ends by
    /// itself).
    pub drain_timeout: Duration,
    /// TLS, the connection cap and the idle timeout.
    pub network: Network,
    /// The access file: principals, their credentials and rights (`None`:
    /// access control off, every caller may do everything).
    pub access_file: Option<std::path::PathBuf>,
    /// Whether server reflection answers callers without credentials when
    /// access control is on.
    pub public_reflection: bool,
    /// Serve a non-loopback address without TLS and access control.
    pub allow_insecure: bool,
    /// Where the broker adds its metrics (`None`: it keeps no gRPC metrics;
    /// the store counts all the same). Serve them with
    /// [`Metrics::serve`].
    pub metrics: Option<Metrics>,
}

impl ServerConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<std::path::PathBuf>) -> Self {
        ServerConfig {
            store: StoreConfig::new(data_dir),
            limits: Limits::default(),
            max_request_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_pending_reset_streams: 100,
            drain_timeout: Duration::from_secs(30),
            network: Network::default(),
            access_file: None,
            public_reflection: true,
            allow_insecure: false,
            metrics: None,
        }
    }
}

async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Opens the store and serves on `listener` until `shutdown` resolves, then
/// drains: health turns NOT_SERVING, streams end with UNAVAILABLE, pending
/// commits finish, and the store closes.
///
/// Fails with `InvalidArgument` for a setting out of range (checked before
/// anything starts), or if the store cannot be opened or the server fails.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_ready(listener, config, shutdown, |_| {}).await
}

/// Runs the broker as [`run`] does, calling `ready` with the listening
/// address once the store is open and the services are about to be served
/// (never if opening fails): the moment to tell scripts the broker is up.
///
/// Fails as [`run`] does.
pub async fn run_with_ready(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
) -> Result<()> {
    crate::config::check_server_config(&config)?;
    check_exposure(&listener, &config)?;
    // The TLS and access files are read once here so that a bad one stops
    // the broker before it opens its storage.
    if let Some(files) = &config.network.tls {
        net::load_tls(files)?;
    }
    if let Some(path) = &config.access_file {
        auth::Access::load(path, config.public_reflection)?;
    }
    let store = Store::open(config.store.clone()).await?;
    let result = serve_with_ready(listener, store.clone(), &config, shutdown, ready).await;
    store.close().await;
    tracing::info!("broker stopped");
    result
}

/// Refuses to serve a non-loopback address without both TLS and access
/// control, unless `allow_insecure` says to; says why either way.
///
/// Fails with `InvalidArgument` naming the address and the flags to give.
fn check_exposure(listener: &TcpListener, config: &ServerConfig) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Unavailable(format!("the listener has no address: {e}")))?;
    let missing: Vec<&str> = [
        (config.network.tls.is_none(), "TLS (--tls-cert, --tls-key)"),
        (
            config.access_file.is_none(),
            "access control (--access-file)",
        ),
    ]
    .into_iter()
    .filter_map(|(absent, what)| absent.then_some(what))
    .collect();
    if addr.ip().is_loopback() || missing.is_empty() {
        return Ok(());
    }
    if config.allow_insecure {
        tracing::warn!(
            %addr,
            missing = %missing.join(" and "),
            "serving a non-loopback address without TLS and access control (--allow-insecure): \
             anyone who can reach it may publish, consume, seek and delete"
        );
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "refusing to serve {addr} without {}: anyone who can reach it could publish, read any \
         subscription, seek it back, purge dead letters or delete topics. Give them, listen on \
         127.0.0.1, or pass --allow-insecure to accept the risk",
        missing.join(" and ")
    )))
}

/// Serves an already opened store; see [`run`]. The store stays open.
///
/// Fails if the server fails.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_with_ready(listener, store, config, shutdown, |_| {}).await
}

async fn serve_with_ready(
    listener: TcpListener,
    store: Store,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
) -> Result<()> {
    let (drain_tx, drain_rx) = watch::channel(false);
    let grpc = config.metrics.as_ref().map(|m| m.broker(&store).grpc);
    let broker = Broker::new(store.clone(), config.limits, drain_rx.clone());
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Health follows storage from the start: a store opened on a full disk
    // serves acks but reads NOT_SERVING.
    let mut healthy = store.health();
    let status = |up: bool| {
        if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let up = *healthy.borrow_and_update();
    set_all(&reporter, status(up)).await;

    // Health follows storage: NOT_SERVING while commits fail or the disk is
    // full, and for good once draining starts.
    let health_task = {
        let reporter = reporter.clone();
        let mut draining = drain_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = Broker::drained(&mut draining) => {
                        set_all(&reporter, ServingStatus::NotServing).await;
                        return;
                    }
                    changed = healthy.changed() => {
                        if changed.is_err() { return; }
                        let up = *healthy.borrow_and_update();
                        if *draining.borrow() { continue; }
                        tracing::warn!(serving = up, "storage health changed");
                        set_all(&reporter, status(up)).await;
                    }
                }
            }
        })
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Storage(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Storage(format!("reflection: {e}")))?;

    let limit = config.max_request_bytes;
    let publisher = PublisherServiceServer::new(publisher::Publisher {
        broker: broker.clone(),
    })
    .max_decoding_message_size(limit);
    let subscriber = SubscriberServiceServer::new(subscriber::Subscriber {
        broker: broker.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(usize::MAX);
    let admin = AdminServiceServer::new(admin::Admin {
        broker: broker.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(usize::MAX);

    let drained = async move {
        shutdown.await;
        tracing::info!("draining: health NOT_SERVING, ending streams, finishing commits");
        let _ = drain_tx.send(true);
    };
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Unavailable(format!("the listener has no address: {e}")))?;
    let tls = match &config.network.tls {
        Some(files) => Some(std::sync::Arc::new(net::load_tls(files)?)),
        None => None,
    };
    let access = match &config.access_file {
        Some(path) => Some(auth::Access::load(path, config.public_reflection)?),
        None => None,
    };
    tracing::info!(%addr, tls = tls.is_some(), access_control = access.is_some(), "serving gRPC");
    // The TLS and access files are read again when they change.
    let reload = (tls.is_some() || access.is_some()).then(|| {
        let (tls, access) = (tls.clone(), access.clone());
        let every = config.network.tls_reload_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Some(tls) = &tls {
                    tls.reload_if_changed();
                }
                if let Some(access) = &access {
                    access.reload_if_changed();
                }
            }
        })
    });
    // The listener is bound and the store open: connections made from now
    // on are served, so this is when the broker is up.
    ready(addr);
    // The broker accepts connections itself (`net.rs`): the cap, TLS and
    // the idle timeout. It sets TCP_NODELAY (without it, small responses
    // wait for delayed ACKs, about 40 ms) and TCP keepalive.
    let counted = grpc.clone();
    let incoming = tokio_stream::wrappers::ReceiverStream::new(net::accept(
        listener,
        &config.network,
        tls,
        config.keepalive_interval,
    ))
    .map(move |s| s.map(|s| Counted::new(s, counted.as_deref())));
    let served = tonic::transport::Server::builder()
        .trace_fn(|request| tracing::info_span!("rpc", method = %request.uri().path()))
        // Outermost, so that it counts the codes the layers below settle.
        .layer(GrpcLayer(grpc))
        .layer(net::ActivityLayer)
        .layer(auth::AuthLayer(access))
        .layer(deadline::DeadlineLayer)
        .layer(tower::util::MapResponseLayer::new(
            decoding::answer as fn(_) -> _,
        ))
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .http2_max_pending_accept_reset_streams(Some(config.max_pending_reset_streams))
        .http2_max_local_error_reset_streams(Some(config.max_pending_reset_streams * 10))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(publisher)
        .add_service(subscriber)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, drained);
    let mut draining = drain_rx.clone();
    let drain_timeout = config.drain_timeout;
    let served = tokio::select! {
        served = served => served,
        _ = async {
            Broker::drained(&mut draining).await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            // Answered calls are committed already; calls still waiting for
            // a commit are committed by the store as it closes, and their
            // clients retry (publishing is idempotent).
            tracing::warn!(?drain_timeout, "drain timeout: closing the remaining connections");
            Ok(())
        }
    };
    health_task.abort();
    if let Some(task) = reload {
        task.abort();
    }
    served.map_err(|e| Error::Unavailable(format!("gRPC server failed: {e}")))
}
