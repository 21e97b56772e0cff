//! The OTLP/gRPC span exporter behind `--otlp-endpoint`: spans of the
//! `tracing` subscriber go through `tracing-opentelemetry` to an
//! OpenTelemetry collector, in batches.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, Tracer};
use tracing::Subscriber;
use tracing_subscriber::registry::LookupSpan;

use crate::error::{Error, Result};

/// A filter for the layer of [`Exporter::layer`]: info and up, the
/// per-message spans of [`super::TARGET`], and nothing of the crates the
/// exporter itself runs on (their spans would be exported by exporting).
pub const DEFAULT_FILTER: &str = "info,tidings::trace=debug,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,opentelemetry=off";

/// Longest one export may take before it is given up (the spans of that
/// batch are dropped; the service is never held up by its collector).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Spans exported to an OTLP/gRPC collector. Add [`Exporter::layer`] to the
/// `tracing` subscriber, and call [`Exporter::shutdown`] before the process
/// ends so that the last batch goes out.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports to `endpoint` (the collector's OTLP/gRPC address, such as
    /// `http://127.0.0.1:4317`) as service `service_name`. Call it inside a
    /// Tokio runtime: the SDK batches spans on a thread of its own, and the
    /// exports run their I/O on this runtime.
    ///
    /// Fails with `InvalidArgument` for an endpoint that is not a URL, or
    /// outside a Tokio runtime. An unreachable collector is not an error:
    /// each batch is tried, and dropped after a while, without holding up
    /// the service.
    pub fn new(endpoint: &str, service_name: &str) -> Result<Exporter> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::InvalidArgument(
                "the OTLP exporter must be started inside a Tokio runtime".into(),
            )
        })?;
        let inner = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| Error::InvalidArgument(format!("OTLP endpoint {endpoint:?}: {e}")))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(OnRuntime { inner, runtime })
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_string())
                    .build(),
            )
            .build();
        Ok(Exporter { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for
    /// this exporter (and lets [`crate::trace`] read and set span contexts).
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, Tracer>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("tidings"))
    }

    /// Sends the spans not exported yet and stops the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The SDK blocks until its thread has exported, and that export
        // runs its I/O on this runtime: block elsewhere.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "the OTLP exporter did not shut down cleanly");
        }
    }
}

/// The OTLP exporter, polled inside the runtime it was built in: the SDK
/// calls exports from its own thread, where tonic would find no reactor
/// and no timer.
#[derive(Debug)]
struct OnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        InRuntime {
            runtime: self.runtime.clone(),
            work: Box::pin(self.inner.export(batch)),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A future that enters `runtime` each time it is polled (never across an
/// `.await`, so it stays `Send`).
struct InRuntime<F> {
    runtime: tokio::runtime::Handle,
    work: Pin<Box<F>>,
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _entered = self.runtime.enter();
        self.work.as_mut().poll(cx)
    }
}
