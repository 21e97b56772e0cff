//! Prometheus metrics: the [`Metrics`] registry that the broker, the relay
//! and the consumer runtime add their metrics to, and its HTTP endpoint
//! (`GET /metrics`, OpenMetrics text, encoded by `prometheus-client`).
//!
//! Counters are kept where the work happens (the store's writer, the
//! relay's status, the consumer's counters) and read at a scrape; gauges
//! that need a database (the store's per-subscription gauges, the outbox's
//! depth) are read once per scrape, one scrape at a time, by a few
//! statements whose cost does not grow with the stored messages.

mod broker;
mod consumer;
mod grpc;
mod relay;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::error::{Error, Result};

pub(crate) use grpc::{Counted, GrpcLayer};

/// The content type of the exposition: OpenMetrics text, which Prometheus
/// reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Something read before each scrape: gauges that need I/O, kept by the
/// collector that encodes them.
trait Refresh: Send + Sync + 'static {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A registry of metrics and the sources read at each scrape. Cheap to
/// clone; every clone is the same registry. Give it to the broker
/// ([`crate::server::ServerConfig::metrics`]), a relay
/// ([`Metrics::relay`]) or a consumer ([`Metrics::consumer`]), and serve it
/// with [`Metrics::serve`] (or [`Metrics::render`] it into a route of your
/// own).
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Mutex<Registry>,
    refreshers: Mutex<Vec<Arc<dyn Refresh>>>,
    /// One scrape at a time: concurrent scrapers wait rather than read the
    /// database side by side.
    scrape: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry; every metric it gets is named `tidings_*`.
    pub fn new() -> Metrics {
        Metrics(Arc::new(Inner {
            registry: Mutex::new(Registry::with_prefix("tidings")),
            refreshers: Mutex::new(Vec::new()),
            scrape: tokio::sync::Mutex::new(()),
        }))
    }

    fn register(&self, with: impl FnOnce(&mut Registry)) {
        let mut registry = self.0.registry.lock().unwrap_or_else(|e| e.into_inner());
        with(&mut registry);
    }

    fn refresh_with(&self, refresher: Arc<dyn Refresh>) {
        let mut list = self.0.refreshers.lock().unwrap_or_else(|e| e.into_inner());
        list.push(refresher);
    }

    /// The exposition: reads the gauges that need I/O, then encodes every
    /// metric as OpenMetrics text.
    pub async fn render(&self) -> String {
        let _one_at_a_time = self.0.scrape.lock().await;
        let refreshers: Vec<Arc<dyn Refresh>> = self
            .0
            .refreshers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for r in &refreshers {
            r.refresh().await;
        }
        let mut text = String::new();
        let registry = self.0.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            // Writing into a String fails only if an encoder refuses a
            // value; the scrape shows what was written so far.
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        text
    }

    /// Serves `GET /metrics` on `listener` until `shutdown` resolves, then
    /// closes the connections it holds.
    ///
    /// Fails only if accepting connections fails for good.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // A connection that failed before it was accepted
                    // (reset, out of descriptors) is that connection's
                    // problem; the listener goes on.
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // Reap finished connections so the set stays small.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let metrics = self.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(metrics.answer(request).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics endpoint: connection ended");
                }
            });
        }
        connections.shutdown().await;
        Ok(())
    }

    async fn answer<B>(&self, request: hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
        let response = |status: u16, content_type: &str, body: String| {
            hyper::Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
        };
        match (request.method().as_str(), request.uri().path()) {
            ("GET", "/metrics") => response(200, CONTENT_TYPE, self.render().await),
            (_, "/metrics") => {
                response(405, "text/plain", "only GET is served on /metrics\n".into())
            }
            _ => response(
                404,
                "text/plain",
                "not found: the metrics are at /metrics\n".into(),
            ),
        }
    }
}

/// Binds the metrics listener at `addr` (what `--metrics-listen` names).
///
/// Fails with `InvalidArgument` if the address cannot be bound.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen for metrics on {addr}: {e}")))
}
