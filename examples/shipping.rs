//! Service B of the orders walkthrough: ships each order the `orders`
//! example publishes, exactly once, in order per customer.
//!
//! ```sh
//! cargo run --example shipping -- --broker http://127.0.0.1:50051 \
//!     --database-url sqlite://shipping.db        # or postgres://user@host/db
//! # against a broker with TLS and access control:
//! cargo run --example shipping -- --broker https://broker.internal:50051 \
//!     --tls-ca ca.pem --token "$SHIPPING_TOKEN" --database-url sqlite://shipping.db
//! ```
//!
//! It creates topic `orders` and the ordered subscription `shipping` if they
//! are missing, migrates its database (the inbox plus its own tables), and
//! consumes until SIGTERM or Ctrl-C. Each message's payload is ASCII
//! `"{order_id} {customer} {n}"`, keyed by customer, with `n` counting 1, 2,
//! 3... per customer. For each one the handler inserts a row in `shipments`
//! (no unique constraint on `order_id`, so a doubled effect would show) and
//! moves `customer_progress`; a customer whose `n` is not its last plus one
//! gets a row in `order_violations`, so a break of per-key order would show
//! too. All of it commits in the inbox transaction.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sqlx::{Pool, Postgres, Sqlite, Transaction};
use tidings::Error;
use tidings::client::{self, Admin, Connection};
use tidings::consumer::{Consumer, ConsumerConfig, Handler};
use tidings::inbox::{Inbox, InboxDatabase};
use tidings::model::{Delivery, StartPosition, SubscriptionSettings};
use tidings::store::NewSubscription;

#[derive(Debug, Parser)]
#[command(about = "Ships orders from the `orders` topic, once each, through the inbox")]
struct Args {
    /// Broker URL (https:// for TLS).
    #[arg(long, env = "TIDINGS_BROKER", default_value = tidings::config::DEFAULT_BROKER)]
    broker: String,
    /// PEM CA bundle that signs the broker's certificate (https://; default:
    /// the Mozilla roots).
    #[arg(long, env = "TIDINGS_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate and key, for a broker that asks for one.
    #[arg(long, env = "TIDINGS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// See --tls-cert.
    #[arg(long, env = "TIDINGS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Bearer token for a broker with access control (the principal needs
    /// consume on the subscription, and admin to create it if missing).
    #[arg(long, env = "TIDINGS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The shipping service's own database: sqlite://PATH or postgres://...
    #[arg(long, env = "SHIPPING_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Subscription to consume (created on topic `orders`, ordered, if missing).
    #[arg(long, default_value = "shipping")]
    subscription: String,
    /// Inbox transactions running at once (each a batch of deliveries).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// How often the inbox is pruned by the broker's ack watermark, in
    /// milliseconds.
    #[arg(long, default_value_t = 60_000)]
    prune_interval_ms: u64,
    /// Longest a processed order's ack waits for others to share its
    /// request, in milliseconds.
    #[arg(long, default_value_t = 2)]
    ack_delay_ms: u64,
    /// Export spans (each handler's `tidings.handle`, a child of the trace
    /// context the message carries) to this OpenTelemetry collector, OTLP
    /// over gRPC, such as http://127.0.0.1:4317.
    #[arg(long, env = "TIDINGS_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};

    let args = Args::parse();
    let exporter = args
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| tidings::trace::otlp::Exporter::new(endpoint, "shipping"))
        .transpose()?;
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let spans = exporter.as_ref().map(|e| {
        e.layer()
            .with_filter(EnvFilter::new(tidings::trace::otlp::DEFAULT_FILTER))
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
    let result = ship(args).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    result
}

async fn ship(args: Args) -> anyhow::Result<()> {
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (None, None, None) => None,
        (ca, cert, key) => Some(client::ClientTls::from_files(
            ca.as_deref(),
            cert.as_deref(),
            key.as_deref(),
        )?),
    };
    let options = client::ConnectOptions {
        tls,
        token: args.token.clone(),
        ..client::ConnectOptions::default()
    };
    let connection = client::connect_with(&args.broker, options)?;
    ensure_subscription(&Admin::new(&connection), &args.subscription).await?;
    let url = args.database_url.clone();
    if url.starts_with("sqlite:") {
        run::<Sqlite>(args, connection).await
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        run::<Postgres>(args, connection).await
    } else {
        anyhow::bail!("--database-url must start with sqlite: or postgres:")
    }
}

/// Creates topic `orders` and the ordered subscription, unless they exist;
/// waits for the broker if it is not up yet.
async fn ensure_subscription(admin: &Admin, subscription: &str) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(50);
    for _ in 0..20 {
        let topic = admin.create_topic("orders").await;
        let result = match topic {
            Err(e) if !matches!(e, Error::AlreadyExists(_)) => Err(e),
            _ => admin
                .create_subscription(NewSubscription {
                    name: subscription.to_owned(),
                    topic: "orders".into(),
                    settings: SubscriptionSettings {
                        ordered: true,
                        ..Default::default()
                    },
                    start: StartPosition::Earliest,
                })
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(Error::AlreadyExists(_)) => return Ok(()),
            Err(e) if e.is_retryable() => {
                tracing::info!(error = %e, "broker not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e).context("creating topic orders and the subscription"),
        }
    }
    anyhow::bail!("broker unreachable")
}

async fn run<DB: ShippingDatabase>(args: Args, connection: Connection) -> anyhow::Result<()>
where
    Shipping: Handler<DB>,
{
    let inbox = Inbox::<DB>::connect(&args.database_url)
        .await
        .context("opening the shipping database")?;
    inbox.migrate().await.context("migrating the inbox")?;
    DB::migrate_app(inbox.pool())
        .await
        .context("migrating the shipping tables")?;
    let config = ConsumerConfig {
        concurrency: args.concurrency,
        prune_interval: Some(Duration::from_millis(args.prune_interval_ms.max(1))),
        ack_delay: Duration::from_millis(args.ack_delay_ms),
        ..ConsumerConfig::default()
    };
    let consumer = Consumer::new(&connection, &args.subscription, inbox, Shipping, config);
    println!(
        "shipping: consuming {} with concurrency {}",
        args.subscription, args.concurrency
    );
    let stats = consumer.run(shutdown_signal()).await?;
    println!(
        "shipping: stopped after {} shipped, {} duplicates skipped, {} failed",
        stats.processed, stats.duplicates, stats.failed
    );
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The handler: one shipment per order, and the per-customer order check.
struct Shipping;

/// One order as the `orders` example publishes it.
struct Order<'a> {
    order_id: &'a str,
    customer: &'a str,
    n: i64,
}

fn parse(delivery: &Delivery) -> Result<Order<'_>, String> {
    let text = std::str::from_utf8(&delivery.message.payload)
        .map_err(|_| "payload is not UTF-8".to_owned())?;
    let mut parts = text.split(' ');
    let (Some(order_id), Some(customer), Some(n), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("payload {text:?} is not \"ORDER CUSTOMER N\""));
    };
    let n = n
        .parse()
        .map_err(|_| format!("bad n in payload {text:?}"))?;
    Ok(Order {
        order_id,
        customer,
        n,
    })
}

/// Why a shipment failed: the text becomes the nack reason.
#[derive(Debug)]
enum ShipError {
    BadPayload(String),
    Database(sqlx::Error),
}

impl std::fmt::Display for ShipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShipError::BadPayload(why) => write!(f, "bad order: {why}"),
            ShipError::Database(e) => write!(f, "shipping database: {e}"),
        }
    }
}

impl From<sqlx::Error> for ShipError {
    fn from(e: sqlx::Error) -> Self {
        ShipError::Database(e)
    }
}

/// The shipping service's own tables, with `$id` as the type of their
/// generated keys. `shipments` has no unique constraint on `order_id`, so a
/// doubled effect would show.
macro_rules! schema {
    ($id:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS shipments (
                 id ",
            $id,
            " PRIMARY KEY,
                 order_id TEXT NOT NULL,
                 customer TEXT NOT NULL,
                 n BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS customer_progress (
                 customer TEXT PRIMARY KEY,
                 last_n BIGINT);
             CREATE TABLE IF NOT EXISTS order_violations (
                 id ",
            $id,
            " PRIMARY KEY,
                 customer TEXT NOT NULL,
                 expected BIGINT NOT NULL,
                 got BIGINT NOT NULL,
                 order_id TEXT NOT NULL);"
        )
    };
}

/// The shipping service's own tables, per backend.
trait ShippingDatabase: InboxDatabase {
    fn migrate_app(pool: &Pool<Self>) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

impl ShippingDatabase for Postgres {
    async fn migrate_app(pool: &Pool<Self>) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        // Two services starting at once must not race on CREATE TABLE.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('shipping-example'))")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(schema!("BIGSERIAL"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
}

impl ShippingDatabase for Sqlite {
    async fn migrate_app(pool: &Pool<Self>) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(schema!("INTEGER")).execute(pool).await?;
        Ok(())
    }
}

/// The handler, the same on both backends: sqlx accepts PostgreSQL's `$1`
/// placeholders on SQLite too, and the statements are plain SQL.
macro_rules! shipping_handler {
    ($db:ty) => {
        impl Handler<$db> for Shipping {
            type Error = ShipError;

            async fn handle(
                &self,
                delivery: &Delivery,
                tx: &mut Transaction<'static, $db>,
            ) -> Result<(), ShipError> {
                let order = parse(delivery).map_err(ShipError::BadPayload)?;
                sqlx::query("INSERT INTO shipments (order_id, customer, n) VALUES ($1, $2, $3)")
                    .bind(order.order_id)
                    .bind(order.customer)
                    .bind(order.n)
                    .execute(&mut **tx)
                    .await?;
                let last: Option<Option<i64>> =
                    sqlx::query_scalar("SELECT last_n FROM customer_progress WHERE customer = $1")
                        .bind(order.customer)
                        .fetch_optional(&mut **tx)
                        .await?;
                let expected = last.flatten().unwrap_or(0) + 1;
                if order.n != expected {
                    sqlx::query(
                        "INSERT INTO order_violations (customer, expected, got, order_id) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(order.customer)
                    .bind(expected)
                    .bind(order.n)
                    .bind(order.order_id)
                    .execute(&mut **tx)
                    .await?;
                }
                sqlx::query(
                    "INSERT INTO customer_progress (customer, last_n) VALUES ($1, $2) \
                     ON CONFLICT (customer) DO UPDATE SET last_n = excluded.last_n",
                )
                .bind(order.customer)
                .bind(order.n)
                .execute(&mut **tx)
                .await?;
                Ok(())
            }
        }
    };
}

shipping_handler!(Postgres);
shipping_handler!(Sqlite);
