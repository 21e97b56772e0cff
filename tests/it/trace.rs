//! Trace context end to end (issue 13): the producer's span, through the
//! outbox row, the relay and the broker, is the parent of the consumer
//! handler's span, all in one trace. Spans go to an in-memory exporter
//! through the `tracing` ↔ OpenTelemetry bridge, installed for this test's
//! thread only (a current-thread runtime, so the in-process broker, relay
//! and consumer all run there).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use sqlx::Transaction;
use tidings::client::{Backoff, Outgoing};
use tidings::consumer::{Consumer, ConsumerConfig, ConsumerStats, Handler};
use tidings::inbox::Inbox;
use tidings::model::Delivery;
use tidings::outbox::{self, Relay};
use tidings::trace::{TRACEPARENT, TraceParent};
use tokio::sync::oneshot;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

use crate::harness::{Backend, TestBroker, ms};
use crate::outbox::{AppDb, relay_config};

/// What the handler saw of one message: its traceparent attribute and the
/// trace of the span it ran in.
#[derive(Debug, Clone)]
struct Seen {
    payload: String,
    traceparent: Option<String>,
    trace_id: TraceId,
}

#[derive(Clone, Default)]
struct Witness(Arc<Mutex<Vec<Seen>>>);

impl Handler<sqlx::Sqlite> for Witness {
    type Error = String;

    async fn handle(
        &self,
        d: &Delivery,
        _tx: &mut Transaction<'static, sqlx::Sqlite>,
    ) -> Result<(), String> {
        let context = tracing::Span::current().context();
        let seen = Seen {
            payload: String::from_utf8_lossy(&d.message.payload).into_owned(),
            traceparent: tidings::trace::attribute(&d.message.attributes, TRACEPARENT)
                .map(str::to_string),
            trace_id: context.span().span_context().trace_id(),
        };
        self.0.lock().expect("witness").push(seen);
        Ok(())
    }
}

/// Consumes `n` messages of subscription "s" through an inbox in `dir`.
async fn consume(broker: &TestBroker, dir: &std::path::Path, n: u64) -> Vec<Seen> {
    let inbox =
        Inbox::<sqlx::Sqlite>::connect(&format!("sqlite://{}", dir.join("inbox.db").display()))
            .await
            .expect("inbox");
    inbox.migrate().await.expect("migrate inbox");
    let witness = Witness::default();
    let config = ConsumerConfig {
        prune_interval: None,
        reconnect: Backoff {
            min: ms(20),
            max: ms(200),
            give_up_after: None,
        },
        ..ConsumerConfig::default()
    };
    let consumer = Consumer::new(&broker.connection, "s", inbox, witness.clone(), config);
    let monitor = consumer.monitor();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(
        Duration::from_secs(30),
        monitor.wait_for(|s: &ConsumerStats| s.acked >= n),
    )
    .await
    .expect("the consumer acked every message in time");
    let _ = stop.send(());
    task.await.expect("consumer task").expect("consumer ran");
    let mut seen = witness.0.lock().expect("witness").clone();
    seen.sort_by(|a, b| a.payload.cmp(&b.payload));
    seen
}

/// Installs the bridge to an in-memory exporter for this thread, until the
/// guard is dropped.
fn record_spans() -> (
    InMemorySpanExporter,
    SdkTracerProvider,
    tracing::subscriber::DefaultGuard,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("trace-test")));
    let installed = tracing::subscriber::set_default(subscriber);
    (exporter, provider, installed)
}

/// The finished spans named `name`.
fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_the_producer_span_through_outbox_relay_and_broker_to_the_handler() {
    let (exporter, provider, _installed) = record_spans();

    let broker = TestBroker::start(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    let app = AppDb::create(&Backend::Sqlite).await;
    let AppDb::Sqlite { pool, .. } = &app else {
        unreachable!("a SQLite application database")
    };

    // Three rows: one enqueued in the producer's span, one outside any
    // span, one inside a span but with the producer's own traceparent.
    let producer = tracing::info_span!("place_order");
    let producer_context = producer.context().span().span_context().clone();
    assert!(
        producer_context.is_valid(),
        "the bridge gives the span a context"
    );
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    async {
        let mut tx = pool.begin().await.expect("begin");
        outbox::enqueue(&mut tx, &Outgoing::new("orders", "1 traced"))
            .await
            .expect("enqueue");
        let mut explicit = Outgoing::new("orders", "3 explicit");
        explicit.attributes.insert(TRACEPARENT.into(), own.into());
        outbox::enqueue(&mut tx, &explicit).await.expect("enqueue");
        tx.commit().await.expect("commit");
    }
    .instrument(producer.clone())
    .await;
    let mut tx = pool.begin().await.expect("begin");
    outbox::enqueue(&mut tx, &Outgoing::new("orders", "2 untraced"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    drop(producer);

    let relay = Relay::start(app.outbox(), relay_config(&broker))
        .await
        .expect("relay");
    let dir = tempfile::tempdir().expect("temp dir");
    let seen = consume(&broker, dir.path(), 3).await;
    relay.stop().await;
    broker.stop().await;
    app.drop().await;

    // The stored attribute is the producer span's context.
    let trace_id = producer_context.trace_id();
    let expected = TraceParent {
        trace_id: trace_id.to_bytes(),
        parent_id: producer_context.span_id().to_bytes(),
        flags: producer_context.trace_flags().to_u8(),
    }
    .to_string();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0].traceparent.as_deref(), Some(expected.as_str()));
    assert_eq!(
        seen[0].trace_id, trace_id,
        "the handler ran in the producer's trace"
    );
    // No span, no context: the handler's span starts a trace of its own.
    assert_eq!(seen[1].traceparent, None);
    assert_ne!(seen[1].trace_id, trace_id);
    // The producer's own traceparent is kept, and followed.
    assert_eq!(seen[2].traceparent.as_deref(), Some(own));
    assert_eq!(
        seen[2].trace_id,
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("hex")
    );

    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("finished spans");
    let in_trace = |s: &&SpanData| s.span_context.trace_id() == trace_id;
    let children = |name: &str| -> Vec<SpanId> {
        named(&spans, name)
            .into_iter()
            .filter(in_trace)
            .map(|s| s.parent_span_id)
            .collect()
    };
    assert_eq!(named(&spans, "place_order").len(), 1);
    // The relay's, the broker's and the handler's span of the traced row
    // are children of the producer's span (a relay that resends a batch
    // would add one of each).
    for hop in ["tidings.relay", "tidings.publish", "tidings.handle"] {
        let parents = children(hop);
        assert!(
            !parents.is_empty(),
            "no {hop} span in the producer's trace: {spans:#?}"
        );
        assert!(
            parents.iter().all(|p| *p == producer_context.span_id()),
            "{hop}: {parents:?}"
        );
    }
    // The relay and the broker open no span for a message without a
    // context; the handler always does.
    assert_eq!(named(&spans, "tidings.relay").len(), 2, "two traced rows");
    assert_eq!(named(&spans, "tidings.publish").len(), 2, "two traced rows");
    assert_eq!(named(&spans, "tidings.handle").len(), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn a_directly_published_message_carries_the_span_it_was_sent_from() {
    let (_exporter, _provider, _installed) = record_spans();

    let broker = TestBroker::start(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    let sender = tracing::info_span!("send");
    let context = sender.context().span().span_context().clone();
    let message = sender.in_scope(|| Outgoing::new("orders", "1 direct").with_trace_context());
    let untouched = Outgoing::new("orders", "2 plain").with_trace_context();
    assert!(
        !untouched.attributes.contains_key(TRACEPARENT),
        "no span, no context"
    );
    broker
        .publisher()
        .publish(&[message, untouched])
        .await
        .expect("publish");
    drop(sender);
    let dir = tempfile::tempdir().expect("temp dir");
    let seen = consume(&broker, dir.path(), 2).await;
    broker.stop().await;
    assert_eq!(seen[0].trace_id, context.trace_id());
    assert_eq!(seen[1].traceparent, None);
    assert_ne!(seen[1].trace_id, context.trace_id());
}

/// An OTLP collector: the trace service, forwarding what it receives.
struct Collector(tokio::sync::mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test]
async fn serve_exports_a_span_per_traced_message_to_the_otlp_endpoint() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the collector");
    let collector = format!("http://{}", listener.local_addr().expect("address"));
    let (received, mut exports) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(received)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_str().expect("a UTF-8 temp dir");
    let (mut serve, line) = crate::cli::first_line(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--otlp-endpoint",
            &collector,
        ],
        false,
        "tidings listening on ",
    )
    .await;
    let broker = format!(
        "http://{}",
        line.trim_start_matches("tidings listening on ")
    );
    let connection = tidings::client::connect(&broker).expect("connect");
    tidings::client::Admin::new(&connection)
        .create_topic("orders")
        .await
        .expect("create topic");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut traced = Outgoing::new("orders", "traced");
    traced
        .attributes
        .insert(TRACEPARENT.into(), traceparent.into());
    let plain = Outgoing::new("orders", "plain");
    tidings::client::Publisher::new(&connection, Backoff::default())
        .publish(&[traced, plain])
        .await
        .expect("publish");
    // A graceful stop sends the spans not exported yet.
    let pid = serve.id().expect("a running broker");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), serve.wait())
        .await
        .expect("the broker stopped in time")
        .expect("wait");
    assert!(status.success(), "{status:?}");

    let mut publishes = Vec::new();
    let mut services = Vec::new();
    while let Ok(export) = exports.try_recv() {
        for resource in export.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value));
            services.extend(service);
            for scope in resource.scope_spans {
                publishes.extend(
                    scope
                        .spans
                        .into_iter()
                        .filter(|s| s.name == "tidings.publish"),
                );
            }
        }
    }
    server.abort();
    assert_eq!(
        publishes.len(),
        1,
        "one span, for the traced message only: {publishes:?}"
    );
    let parent = TraceParent::parse(traceparent).expect("valid");
    assert_eq!(publishes[0].trace_id, parent.trace_id.to_vec());
    assert_eq!(publishes[0].parent_span_id, parent.parent_id.to_vec());
    assert!(
        services.iter().all(|s| s.contains("tidings-broker")),
        "{services:?}"
    );
}
