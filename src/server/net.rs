//! Connections: the accept loop, TLS, the cap on open connections and the
//! idle timeout.
//!
//! The broker accepts connections itself rather than through tonic's
//! listener so that it can (1) refuse connections beyond
//! [`Network::max_connections`] at once, with a log line, instead of
//! running out of file descriptors; (2) take each TLS handshake off the
//! accept loop, bounded by [`Network::handshake_timeout`]; (3) serve a
//! certificate that changed on disk without a restart; and (4) close a
//! connection that has had no call in progress for
//! [`Network::idle_timeout`] (a socket that never speaks included), the
//! way gRPC servers' "max connection idle" does.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};

use super::reload::Reloading;
use crate::error::{Error, Result};

/// Whether a TLS server asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    None,
    /// A client may present a certificate (verified against the CA bundle);
    /// one without is still served.
    Optional,
    /// Every client must present a certificate signed by the CA bundle.
    Required,
}

/// The files of a TLS server, read at start and again whenever one of them
/// changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Whether clients are asked for a certificate.
    pub client_auth: ClientAuth,
}

/// How the broker treats connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// TLS, or plain text.
    pub tls: Option<TlsFiles>,
    /// Most connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// A connection with no call in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How often the TLS files are checked for changes.
    pub tls_reload_interval: Duration,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            tls_reload_interval: Duration::from_secs(10),
        }
    }
}

/// Default of [`Network::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// What a call knows of its connection, in its request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: Option<std::net::SocketAddr>,
    /// The client's certificate chain (mutual TLS), its own first.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    state: Arc<ConnState>,
}

/// Calls in progress on a connection and when the last one ended.
#[derive(Debug)]
struct ConnState {
    active: AtomicUsize,
    /// Milliseconds since `born` when the connection last had a call in
    /// progress (or was accepted).
    last_busy: AtomicU64,
    born: Instant,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            active: AtomicUsize::new(0),
            last_busy: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_busy.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the connection may be closed as idle, or `None` while a call
    /// is in progress.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_busy.load(Ordering::Relaxed));
        Some(self.born + last + idle)
    }
}

/// Marks a call in progress until dropped.
#[derive(Debug)]
struct Busy(Arc<ConnState>);

impl Busy {
    fn new(state: Arc<ConnState>) -> Self {
        state.active.fetch_add(1, Ordering::AcqRel);
        state.touch();
        Busy(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The transport under a connection.
#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: its transport, its slot under the cap, and its
/// idle timer, which ends the connection (as a read error) once no call
/// has been in progress for the idle timeout.
#[derive(Debug)]
pub(crate) struct Conn {
    io: Io,
    info: ConnInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// Whether the idle timer says to close; rearms it otherwise.
    fn idled_out(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let deadline = self
                .info
                .state
                .idle_deadline(self.idle_timeout)
                .unwrap_or_else(|| Instant::now() + self.idle_timeout);
            let deadline = tokio::time::Instant::from_std(deadline);
            if self.idle.deadline() != deadline {
                self.idle.as_mut().reset(deadline);
            }
            if self.idle.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.info.state.idle_deadline(self.idle_timeout).is_some() {
                return true;
            }
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.idled_out(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no call in progress for the idle timeout",
            )));
        }
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---- TLS ----

/// The server's TLS configuration, read again when its files change.
pub(crate) type Tls = Reloading<rustls::ServerConfig>;

/// Reads the TLS files.
///
/// Fails with `InvalidArgument` naming the file that is missing or not
/// what it should be.
pub(crate) fn load_tls(files: &TlsFiles) -> Result<Tls> {
    let paths = [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    let files = files.clone();
    Reloading::new("TLS files", paths, move || server_config(&files))
}

fn tls_error(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what} {}: {e}", path.display()))
}

fn certificates(path: &std::path::Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(what, path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(what, path, e))?;
    if certs.is_empty() {
        return Err(tls_error(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| tls_error("--tls-key", &files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?;
    let builder = match (&files.client_ca, files.client_auth) {
        (_, ClientAuth::None) => builder.with_no_client_auth(),
        (None, _) => {
            return Err(Error::InvalidArgument(
                "client certificates need a CA bundle to check them against: give --tls-ca".into(),
            ));
        }
        (Some(ca), auth) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca, "--tls-ca")? {
                roots.add(cert).map_err(|e| tls_error("--tls-ca", ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = match auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier.build().map_err(|e| tls_error("--tls-ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("--tls-cert and --tls-key", &files.cert, e))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

// ---- accepting ----

/// Accepts connections on `listener` for as long as the returned receiver
/// lives: each gets a slot under the cap, TCP_NODELAY and keepalive, and a
/// TLS handshake of its own (bounded) when TLS is on.
pub(crate) fn accept(
    listener: TcpListener,
    network: &Network,
    tls: Option<Arc<Tls>>,
    tcp_keepalive: Duration,
) -> mpsc::Receiver<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(network.max_connections));
    let network = network.clone();
    tokio::spawn(async move {
        let mut refused = crate::store::LogLimit::new(Duration::from_secs(10));
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(skipped) = refused.hit(Instant::now()) {
                    tracing::warn!(
                        max_connections = network.max_connections,
                        %remote,
                        refused_since_last_line = skipped,
                        "connection limit reached: closing new connections until some end \
                         (--max-connections)"
                    );
                }
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(tcp_keepalive);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let tx = tx.clone();
            let tls = tls.as_ref().map(|t| TlsAcceptor::from(t.get()));
            let handshake_timeout = network.handshake_timeout;
            let idle_timeout = network.idle_timeout;
            tokio::spawn(async move {
                let (io, peer_certs) = match tls {
                    None => (Io::Plain(stream), None),
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(s)) => {
                                let certs = s.get_ref().1.peer_certificates().map(|c| {
                                    Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())
                                });
                                (Io::Tls(Box::new(s)), certs)
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, ?handshake_timeout, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let state = Arc::new(ConnState::new());
                let conn = Conn {
                    io,
                    info: ConnInfo {
                        remote: Some(remote),
                        peer_certs,
                        state,
                    },
                    idle_timeout,
                    idle: Box::pin(tokio::time::sleep(idle_timeout)),
                    _slot: slot,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    rx
}

// ---- calls in progress ----

/// Marks each call in progress on its connection for the idle timeout, for
/// as long as its response (a stream's included) is being sent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Activity<S>;

    fn layer(&self, inner: S) -> Activity<S> {
        Activity { inner }
    }
}

/// See [`ActivityLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Activity<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Activity<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let busy = request
            .extensions()
            .get::<ConnInfo>()
            .map(|c| Busy::new(c.state.clone()));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match busy {
                Some(busy) => {
                    response.map(|body| tonic::body::Body::new(Marked { body, _busy: busy }))
                }
                None => response,
            })
        })
    }
}

/// A response body that keeps its call marked in progress until it ends.
#[derive(Debug)]
struct Marked {
    body: tonic::body::Body,
    _busy: Busy,
}

impl http_body::Body for Marked {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
