//! The gRPC layer's metrics: calls per method and status code, their
//! latency (to the end of the response, so a stream counts for as long as
//! it is open), the calls open now, and the connections. A tower layer
//! over every service, and a wrapper of the accepted TCP streams.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::Service;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::transport::server::Connected;

/// Upper bounds of the call latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// What a method's label says for a path no service serves: clients choose
/// paths, so only the known ones become labels.
const OTHER: &str = "other";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    method: Arc<str>,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: Arc<str>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The gRPC layer's metrics.
#[derive(Debug)]
pub(crate) struct GrpcMetrics {
    /// Every method the server serves, as `package.Service/Method`.
    methods: HashSet<Arc<str>>,
    other: Arc<str>,
    calls: Family<Call, Counter>,
    latency: Family<Method, Histogram, fn() -> Histogram>,
    open: Family<Method, Gauge>,
    connections: Gauge,
    accepted: Counter,
}

impl GrpcMetrics {
    pub(super) fn new() -> GrpcMetrics {
        let mut methods = HashSet::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            // The descriptor sets are compiled in; one that does not decode
            // only leaves its methods labelled "other".
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = service.name.unwrap_or_default();
                    for method in service.method {
                        let name = format!(
                            "{package}.{service_name}/{}",
                            method.name.unwrap_or_default()
                        );
                        methods.insert(Arc::from(name));
                    }
                }
            }
        }
        for reflection in [
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            methods.insert(Arc::from(reflection));
        }
        GrpcMetrics {
            methods,
            other: Arc::from(OTHER),
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            open: Family::default(),
            connections: Gauge::default(),
            accepted: Counter::default(),
        }
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "grpc_calls",
            "Finished gRPC calls by method and status code",
            self.calls.clone(),
        );
        r.register(
            "grpc_call_seconds",
            "gRPC call latency by method, to the end of the response (a stream's lifetime)",
            self.latency.clone(),
        );
        r.register(
            "grpc_open_calls",
            "gRPC calls open now by method (open streams: Subscribe, PublishStream, Watch)",
            self.open.clone(),
        );
        r.register(
            "grpc_connections",
            "Client connections open now",
            self.connections.clone(),
        );
        r.register(
            "grpc_accepted_connections",
            "Client connections accepted",
            self.accepted.clone(),
        );
    }

    /// The label of `path` (`/package.Service/Method`).
    fn method(&self, path: &str) -> Arc<str> {
        let name = path.strip_prefix('/').unwrap_or(path);
        self.methods
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }
}

/// Adds [`Metered`] to a service: with `None`, calls pass through untouched.
#[derive(Debug, Clone, Default)]
pub(crate) struct GrpcLayer(pub(crate) Option<Arc<GrpcMetrics>>);

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = MeteredService<S>;

    fn layer(&self, inner: S) -> MeteredService<S> {
        MeteredService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// A service whose calls are counted and timed.
#[derive(Debug, Clone)]
pub(crate) struct MeteredService<S> {
    inner: S,
    metrics: Option<Arc<GrpcMetrics>>,
}

impl<S, B> Service<Request<B>> for MeteredService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(metrics) = self.metrics.clone() else {
            return Box::pin(self.inner.call(request));
        };
        let method = metrics.method(request.uri().path());
        let call = Open::new(metrics, method);
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let mut call = call;
                    // A trailers-only answer (an error, mostly) carries its
                    // status in the headers.
                    call.code = status(&parts.headers);
                    let body = tonic::body::Body::new(Metered { body, call });
                    Ok(Response::from_parts(parts, body))
                }
                Err(e) => {
                    let mut call = call;
                    call.code = Some("UNKNOWN");
                    Err(e)
                }
            }
        })
    }
}

/// A call in progress: counted as open until dropped, then counted with
/// its code and latency.
struct Open {
    metrics: Arc<GrpcMetrics>,
    method: Arc<str>,
    started: Instant,
    code: Option<&'static str>,
}

impl Open {
    fn new(metrics: Arc<GrpcMetrics>, method: Arc<str>) -> Open {
        metrics
            .open
            .get_or_create(&Method {
                method: method.clone(),
            })
            .inc();
        Open {
            metrics,
            method,
            started: Instant::now(),
            code: None,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let method = Method {
            method: self.method.clone(),
        };
        self.metrics.open.get_or_create(&method).dec();
        self.metrics
            .latency
            .get_or_create(&method)
            .observe(self.started.elapsed().as_secs_f64());
        // A response that ended without a status was cut off: the client
        // went away (or the connection broke) before the trailers.
        let code = self.code.unwrap_or("CANCELLED");
        self.metrics
            .calls
            .get_or_create(&Call {
                method: method.method,
                code,
            })
            .inc();
    }
}

/// A response body that notes the `grpc-status` of its trailers.
struct Metered<B> {
    body: B,
    call: Open,
}

impl<B> http_body::Body for Metered<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(code) = status(trailers)
        {
            self.call.code = Some(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The status code named by a `grpc-status` header, if there is one.
fn status(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code = value.to_str().ok()?.parse::<i32>().ok()?;
    Some(code_name(code))
}

/// The canonical name of a gRPC status code.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// An accepted connection, counted while it is open (when metrics are on).
#[derive(Debug)]
pub(crate) struct Counted<S> {
    stream: S,
    open: Option<Gauge>,
}

impl<S> Counted<S> {
    /// `stream`, counted in `metrics` if there are any.
    pub(crate) fn new(stream: S, metrics: Option<&GrpcMetrics>) -> Counted<S> {
        let open = metrics.map(|m| {
            m.accepted.inc();
            m.connections.inc();
            m.connections.clone()
        });
        Counted { stream, open }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.dec();
        }
    }
}

impl<S: Connected> Connected for Counted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> S::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
