//! The Rust client: `Publisher`, `Subscriber` and `Admin` handles over one
//! lazily connected gRPC [`Connection`] that reconnects by itself. They speak
//! domain types ([`crate::model`]) and fail with the crate's [`Error`]; the
//! wire types stay inside this module, converted by [`crate::wire`].
//! Publishing retries retryable failures with exponential backoff (safe: ids
//! make it idempotent); a subscription reconnects its stream after a broker
//! restart.

mod admin;
mod publisher;
mod subscriber;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::NewMessage;

pub use admin::{Admin, DEFAULT_PAGE_SIZE, Pages, Serving};
pub use publisher::{PublishReceiver, PublishSender, PublishSession, Publisher};
pub use subscriber::{Event, FlowControl, Subscriber, Subscription};

/// Exponential backoff between retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Give up after retrying this long (`None`: never).
    pub give_up_after: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_secs(5),
            give_up_after: Some(Duration::from_secs(60)),
        }
    }
}

impl Backoff {
    /// Checks the delays; `what` names the setting in the error.
    ///
    /// Fails with `InvalidArgument` for a delay longer than
    /// [`config::MAX_DURATION`](crate::config::MAX_DURATION).
    pub fn check(&self, what: &str) -> Result<()> {
        crate::config::check_duration(&format!("{what} backoff min"), self.min)?;
        crate::config::check_duration(&format!("{what} backoff max"), self.max)?;
        if let Some(d) = self.give_up_after {
            crate::config::check_duration(&format!("{what} give_up_after"), d)?;
        }
        Ok(())
    }
}

/// A lazily made, self-healing connection to one broker. Cheap to clone;
/// every handle made from it shares the connection.
#[derive(Debug, Clone)]
pub struct Connection {
    transport: Transport,
    url: Arc<str>,
}

/// The channel with the client's credentials on every call: what the
/// generated clients of this crate's handles are made over.
#[derive(Clone)]
pub struct Transport {
    channel: Channel,
    authorization: Option<tonic::codegen::http::HeaderValue>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("Transport")
            .field("token", &self.authorization.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for Transport {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future =
        <Channel as tower::Service<tonic::codegen::http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(
        &mut self,
        mut request: tonic::codegen::http::Request<tonic::body::Body>,
    ) -> Self::Future {
        if let Some(value) = &self.authorization {
            request.headers_mut().insert("authorization", value.clone());
        }
        self.channel.call(request)
    }
}

/// How long a connection attempt may take unless told otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// How long one TCP and HTTP/2 connection attempt may take before it
    /// fails as `Unavailable`.
    pub connect_timeout: Duration,
    /// TLS settings for an `https://` broker (`None`: the Mozilla roots, no
    /// client certificate).
    pub tls: Option<ClientTls>,
    /// A bearer token sent with every call, for a broker with access
    /// control.
    pub token: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
            token: None,
        }
    }
}

/// TLS settings of a client, in PEM.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates that sign the broker's certificate (`None`: the
    /// Mozilla roots built in).
    pub ca: Option<Vec<u8>>,
    /// The client's certificate chain and private key, for brokers that ask
    /// for one (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the broker's certificate must carry (default: the URL's
    /// host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field(
                "identity",
                &self.identity.as_ref().map(|_| "<certificate and key>"),
            )
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    /// Reads the files a command line names: a CA bundle, and a
    /// certificate with its key.
    ///
    /// Fails with `InvalidArgument` naming a file that cannot be read, or a
    /// certificate without a key (or the other way round).
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<ClientTls> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                Error::InvalidArgument(format!("cannot read {what} {}: {e}", path.display()))
            })
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c, "--tls-cert")?, read(k, "--tls-key")?)),
            (None, None) => None,
            _ => {
                return Err(Error::InvalidArgument(
                    "a client certificate needs its key: give both --tls-cert and --tls-key".into(),
                ));
            }
        };
        Ok(ClientTls {
            ca: ca.map(|p| read(p, "--tls-ca")).transpose()?,
            identity,
            domain: None,
        })
    }

    fn config(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => config.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// The broker URL `url` stands for: `http://` is added to an address
/// without a scheme (`127.0.0.1:50051`, `localhost:50051`); `https://`
/// means TLS.
///
/// Fails with `InvalidArgument` for any scheme but `http` and `https`,
/// naming the fix.
pub fn broker_url(url: &str) -> Result<String> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.is_empty() {
            return Err(Error::InvalidArgument(
                "the broker address is empty; give one like http://127.0.0.1:50051".into(),
            ));
        }
        return Ok(format!("http://{url}"));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "https" => Ok(url.to_owned()),
        _ => Err(Error::InvalidArgument(format!(
            "broker URL {url}: unknown scheme {scheme}://; use http://{rest} (plain text) or \
             https://{rest} (TLS)"
        ))),
    }
}

/// Opens a connection to `url` (like `http://127.0.0.1:50051`, or
/// `127.0.0.1:50051`) with default options. The connection is made on first
/// use and remade after failures.
///
/// Fails with `InvalidArgument` if the URL is malformed or not `http`.
pub fn connect(url: &str) -> Result<Connection> {
    connect_with(url, ConnectOptions::default())
}

/// Opens a connection to `url` as [`connect`] does, with `options`.
///
/// Fails with `InvalidArgument` if the URL is malformed or neither `http`
/// nor `https`, TLS settings come with an `http://` URL (a typo that would
/// silently send plain text), or the connect timeout is zero or absurd.
pub fn connect_with(url: &str, options: ConnectOptions) -> Result<Connection> {
    crate::config::check_duration("connect timeout", options.connect_timeout)?;
    if options.connect_timeout.is_zero() {
        return Err(Error::InvalidArgument(
            "the connect timeout must be longer than zero".into(),
        ));
    }
    let url = broker_url(url)?;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::InvalidArgument(format!("bad broker URL {url:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    match (https, &options.tls) {
        (true, tls) => {
            let tls = tls.clone().unwrap_or_default();
            endpoint = endpoint
                .tls_config(tls.config())
                .map_err(|e| Error::InvalidArgument(format!("TLS settings for {url}: {e}")))?;
        }
        (false, Some(_)) => {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            return Err(Error::InvalidArgument(format!(
                "TLS settings were given but the broker URL {url} is plain text; use https://{rest}"
            )));
        }
        (false, None) => {}
    }
    let authorization = match &options.token {
        None => None,
        Some(token) => Some(
            tonic::codegen::http::HeaderValue::try_from(format!("Bearer {}", token.trim()))
                .map(|mut v| {
                    v.set_sensitive(true);
                    v
                })
                .map_err(|_| {
                    Error::InvalidArgument(
                        "the token has characters a header cannot carry (printable ASCII only)"
                            .into(),
                    )
                })?,
        ),
    };
    Ok(Connection {
        transport: Transport {
            channel: endpoint.connect_lazy(),
            authorization,
        },
        url: url.into(),
    })
}

/// `status`'s message followed by the causes tonic keeps apart from it
/// (`tcp connect error: Connection refused (os error 111)`), which say why
/// a broker could not be reached.
fn with_causes(status: &Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl Connection {
    /// The broker's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying gRPC channel, for generated clients of services this
    /// client does not wrap. It sends no token; [`Connection::transport`]
    /// does.
    pub fn channel(&self) -> Channel {
        self.transport.channel.clone()
    }

    /// The channel with the connection's token on every call, for generated
    /// clients (`SubscriberServiceClient::new(connection.transport())`).
    pub fn transport(&self) -> Transport {
        self.transport.clone()
    }

    /// The crate's error for a status this broker answered: the code picks
    /// the variant, the message is kept. This is the one mapping from gRPC
    /// statuses to [`Error`].
    fn error(&self, status: Status) -> Error {
        let message = with_causes(&status);
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(message),
            Code::NotFound => Error::NotFound(message),
            Code::AlreadyExists => Error::AlreadyExists(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            // No variant of their own: the request is refused as the
            // broker is set up (no permission, an older broker).
            Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented => {
                Error::FailedPrecondition(format!("{}: {message}", code_name(status.code())))
            }
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            // Retryable: the broker restarting, draining or unreachable (a
            // failed connect arrives as UNAVAILABLE, so it names the address).
            Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::DeadlineExceeded => {
                Error::Unavailable(format!("broker at {} unavailable: {message}", self.url))
            }
            Code::Internal | Code::DataLoss | Code::Ok => {
                Error::Storage(format!("broker at {}: {message}", self.url))
            }
        }
    }
}

/// The name gRPC gives a status code, as the README writes it (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Idempotency key; a fresh UUID v7 by default.
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Payload.
    pub payload: Vec<u8>,
    /// Attributes.
    pub attributes: HashMap<String, String>,
}

impl Outgoing {
    /// A message with a fresh UUID v7 id.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Outgoing {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            attributes: HashMap::new(),
        }
    }

    /// Sets the ordering key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Adds the current span's W3C trace context as attributes
    /// `traceparent` (and `tracestate`), unless the message has a
    /// `traceparent` already; see [`crate::trace`]. The outbox does this at
    /// enqueue by itself.
    pub fn with_trace_context(mut self) -> Self {
        crate::trace::inject_current(&mut self.attributes);
        self
    }
}

impl From<Outgoing> for NewMessage {
    fn from(m: Outgoing) -> NewMessage {
        let mut attributes: Vec<(String, String)> = m.attributes.into_iter().collect();
        attributes.sort();
        NewMessage {
            id: m.id,
            topic: m.topic,
            key: m.key,
            payload: m.payload,
            attributes,
            created_at: None,
        }
    }
}

/// Calls `call` until it succeeds, fails for good, or `backoff` gives up.
async fn retry<T, F, Fut>(backoff: Backoff, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = backoff.min;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                if backoff
                    .give_up_after
                    .is_some_and(|limit| started.elapsed() >= limit)
                {
                    return Err(e);
                }
                tracing::debug!(error = %e, ?delay, "retrying after a retryable failure");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn statuses_map_to_the_crate_error_keeping_their_message() {
        let c = connect("http://127.0.0.1:1").unwrap();
        let e = c.error(Status::not_found("no topic t"));
        assert!(
            matches!(&e, Error::NotFound(m) if m == "no topic t"),
            "{e:?}"
        );
        let e = c.error(Status::unavailable("connection refused"));
        assert!(e.is_retryable());
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        assert!(matches!(
            c.error(Status::failed_precondition("stale")),
            Error::FailedPrecondition(_)
        ));
        assert!(matches!(
            c.error(Status::internal("boom")),
            Error::Storage(_)
        ));
    }

    #[test]
    fn broker_urls_get_a_scheme_and_refuse_what_they_cannot_speak() {
        assert_eq!(
            broker_url("127.0.0.1:50051").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(broker_url("http://h:1").unwrap(), "http://h:1");
        assert_eq!(broker_url("https://h:1").unwrap(), "https://h:1");
        let e = broker_url("grpc://h:1").unwrap_err().to_string();
        assert!(
            e.contains("use http://h:1") && e.contains("https://h:1"),
            "{e}"
        );
        let zero = ConnectOptions {
            connect_timeout: Duration::ZERO,
            ..ConnectOptions::default()
        };
        assert!(connect_with("h:1", zero).is_err());
        // TLS settings with a plain-text URL are a mistake, not a downgrade.
        let tls = ConnectOptions {
            tls: Some(ClientTls::default()),
            ..ConnectOptions::default()
        };
        let e = connect_with("http://h:1", tls).unwrap_err().to_string();
        assert!(e.contains("use https://h:1"), "{e}");
    }

    #[test]
    fn a_malformed_url_is_an_invalid_argument() {
        assert!(matches!(
            connect("not a url"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
