//! A cutting TCP proxy for partition tests: it sits between a part of
//! tidings and its database and can black-hole, freeze or reset the link.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the proxy does to the bytes of each connection. Connections are
/// numbered in the order they were accepted.
#[derive(Debug, Clone, Default)]
struct Cut {
    /// Nothing is forwarded either way, on any connection, old or new;
    /// sockets stay open and nothing is reset, as on a link that drops
    /// every packet. Bytes wait, so a healed link carries on where it
    /// stopped, as TCP would after retransmitting.
    black_hole: bool,
    /// Connections numbered below this never forward a byte again and are
    /// never closed: a frozen link, which nothing ever resets.
    frozen_below: u64,
    /// These connections never forward a byte again, like those below
    /// `frozen_below`.
    frozen: BTreeSet<u64>,
    /// Connections numbered below this are closed at once.
    reset_below: u64,
}

/// A TCP proxy on `127.0.0.1:0` forwarding to an upstream address. Dropping
/// it closes every connection it holds.
#[derive(Debug)]
pub(crate) struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<Cut>,
    accepted: watch::Receiver<u64>,
    /// Each connection's number by the local port of its upstream side
    /// (the client port the database sees).
    ports: Arc<Mutex<HashMap<u16, u64>>>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet), so
        // aborting it ends them all.
        self.task.abort();
    }
}

impl Proxy {
    /// Starts forwarding connections made to [`Proxy::addr`] to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (cut, cut_rx) = watch::channel(Cut::default());
        let (accepted_tx, accepted) = watch::channel(0u64);
        let ports = Arc::new(Mutex::new(HashMap::new()));
        let known = ports.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            let mut next = 0u64;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let number = next;
                next += 1;
                accepted_tx.send_replace(next);
                connections.spawn(carry(
                    client,
                    upstream,
                    number,
                    cut_rx.clone(),
                    known.clone(),
                ));
                // Reap finished connections so the set does not grow.
                while connections.try_join_next().is_some() {}
            }
        });
        Proxy {
            addr,
            cut,
            accepted,
            ports,
            task,
        }
    }

    /// The address to connect to instead of the upstream.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding bytes both ways on every connection, keeping the
    /// sockets open: no FIN, no RST.
    pub(crate) fn black_hole(&self) {
        self.cut.send_modify(|c| c.black_hole = true);
    }

    /// Forwards again, on the connections that are not frozen or reset.
    pub(crate) fn heal(&self) {
        self.cut.send_modify(|c| c.black_hole = false);
    }

    /// Freezes every connection open now, forever (no byte, no close);
    /// connections made later pass.
    pub(crate) fn freeze(&self) {
        let accepted = *self.accepted.borrow();
        self.cut.send_modify(|c| c.frozen_below = accepted);
    }

    /// Freezes, forever, those of this proxy's connections whose upstream
    /// side has one of these local ports (`client_port` in the database's
    /// `pg_stat_activity`); returns how many it froze. Others pass.
    pub(crate) fn freeze_ports(&self, ports: &[u16]) -> usize {
        let known = self.ports.lock().expect("ports");
        let numbers: Vec<u64> = ports.iter().filter_map(|p| known.get(p).copied()).collect();
        self.cut.send_modify(|c| c.frozen.extend(&numbers));
        numbers.len()
    }

    /// Closes every connection open now; connections made later pass.
    pub(crate) fn reset(&self) {
        let accepted = *self.accepted.borrow();
        self.cut.send_modify(|c| c.reset_below = accepted);
    }

    /// How many connections the proxy has accepted so far.
    pub(crate) fn accepted(&self) -> u64 {
        *self.accepted.borrow()
    }
}

/// Carries one connection until either side closes it or the proxy resets
/// it.
async fn carry(
    client: TcpStream,
    upstream: SocketAddr,
    number: u64,
    cut: watch::Receiver<Cut>,
    ports: Arc<Mutex<HashMap<u16, u64>>>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    if let Ok(local) = server.local_addr() {
        ports.lock().expect("ports").insert(local.port(), number);
    }
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut up = tokio::spawn(pipe(client_read, server_write, number, cut.clone()));
    let mut down = tokio::spawn(pipe(server_read, client_write, number, cut));
    // Each direction ends on its own (a half-close); a reset ends both.
    tokio::select! {
        _ = &mut up => { let _ = down.await; }
        _ = &mut down => { let _ = up.await; }
    }
}

/// Copies one direction, holding bytes while the link is cut.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    number: u64,
    mut cut: watch::Receiver<Cut>,
) {
    let reset = |c: &Cut| number < c.reset_below;
    let passes = |c: &Cut| {
        reset(c) || (!c.black_hole && number >= c.frozen_below && !c.frozen.contains(&number))
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            },
            _ = cut.wait_for(reset) => return,
        };
        // Hold what was read (an end of stream too) until the link passes.
        let Ok(now) = cut.wait_for(passes).await.map(|c| c.clone()) else {
            return;
        };
        if reset(&now) {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The address of the PostgreSQL server a URL names.
pub(crate) fn upstream_of(url: &str) -> SocketAddr {
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a PostgreSQL URL");
    let host = match options.get_host() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    format!("{host}:{}", options.get_port())
        .parse()
        .expect("the test database at a numeric address")
}

/// `url` with its host and port replaced by `addr`: the same database,
/// reached through a proxy.
pub(crate) fn through(url: &str, addr: SocketAddr) -> String {
    let start = url.find("://").expect("a URL with a scheme") + 3;
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{}{userinfo}{addr}{}", &url[..start], &url[end..])
}

#[test]
fn through_replaces_only_the_host_and_port() {
    let addr: SocketAddr = "127.0.0.1:4000".parse().expect("address");
    assert_eq!(
        through("postgres://u:p@127.0.0.1:5432/db?sslmode=disable", addr),
        "postgres://u:p@127.0.0.1:4000/db?sslmode=disable"
    );
    assert_eq!(
        through("postgres://localhost/db", addr),
        "postgres://127.0.0.1:4000/db"
    );
}
