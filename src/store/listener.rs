//! A PostgreSQL LISTEN connection that is checked for life: the broker's
//! wake-ups from other instances and the relay's from the outbox trigger.
//!
//! Waiting on LISTEN alone cannot tell a quiet channel from a frozen link
//! (packets dropped, no reset): both deliver nothing, for ever, and the
//! wake-ups fall back to polling without a word. So when nothing arrived for
//! `interval`, a ping is sent on the same channel through another
//! connection; if neither it nor anything else comes back within `bound`,
//! the listening connection is replaced and the caller is told to look for
//! what it may have missed.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgNotification, PgPool, PgPoolOptions};
use tokio::time::Instant;
use uuid::Uuid;

/// Payloads of liveness pings start with this; they are never handed on.
const PING: &str = "tidings-listen-ping:";

/// How a LISTEN connection is checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenCheck {
    /// Ping when nothing arrived for this long.
    pub(crate) interval: Duration,
    /// The ping must come back within this, or the connection is replaced;
    /// also the bound of sending the ping and of opening a new connection.
    pub(crate) bound: Duration,
}

/// What [`WatchedListener::recv`] heard.
#[derive(Debug)]
pub(crate) enum Heard {
    /// A notification from someone else.
    Notification(PgNotification),
    /// The connection was replaced: notifications sent meanwhile are lost,
    /// so the caller should look for what they would have said.
    Replaced,
}

/// A LISTEN on one channel, on a connection of its own, checked for life.
#[derive(Debug)]
pub(crate) struct WatchedListener {
    /// `None` after a replacement failed; the next `recv` tries again.
    listener: Option<PgListener>,
    /// Where pings are sent from, and whose settings new listening
    /// connections copy.
    pool: PgPool,
    channel: &'static str,
    check: ListenCheck,
    heard: Instant,
    /// The ping in flight: its payload and when it was sent.
    ping: Option<(String, Instant)>,
    /// Whether the replacement was logged (once per outage).
    warned: bool,
}

impl WatchedListener {
    /// Listens on `channel` over a connection made with `pool`'s settings.
    ///
    /// Fails if the connection or LISTEN fails.
    pub(crate) async fn connect(
        pool: &PgPool,
        channel: &'static str,
        check: ListenCheck,
    ) -> Result<WatchedListener, sqlx::Error> {
        let listener = listen(pool, channel, check.bound).await?;
        Ok(WatchedListener {
            listener: Some(listener),
            pool: pool.clone(),
            channel,
            check,
            heard: Instant::now(),
            ping: None,
            warned: false,
        })
    }

    /// The next notification, or [`Heard::Replaced`] after the connection
    /// was found dead and replaced.
    ///
    /// Fails when the listening connection fails and cannot be replaced
    /// at once (the caller polls meanwhile and calls again).
    pub(crate) async fn recv(&mut self) -> Result<Heard, sqlx::Error> {
        loop {
            let Some(listener) = &mut self.listener else {
                return self.replace().await.map(|()| Heard::Replaced);
            };
            let deadline = match &self.ping {
                None => self.heard + self.check.interval,
                Some((_, sent)) => *sent + self.check.bound,
            };
            tokio::select! {
                received = listener.recv() => {
                    let n = received?;
                    // Anything that arrives proves the link, pings of other
                    // instances included.
                    self.heard = Instant::now();
                    self.ping = None;
                    if self.warned {
                        self.warned = false;
                        tracing::info!(channel = self.channel, "LISTEN connection answers again");
                    }
                    if !n.payload().starts_with(PING) {
                        return Ok(Heard::Notification(n));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if self.ping.take().is_some() {
                        if !self.warned {
                            self.warned = true;
                            tracing::warn!(
                                channel = self.channel, bound = ?self.check.bound,
                                "LISTEN connection did not hear its ping back; replacing it"
                            );
                        }
                        self.listener = None;
                        return self.replace().await.map(|()| Heard::Replaced);
                    }
                    self.send_ping().await;
                }
            }
        }
    }

    /// Notifications already received, without waiting; pings are dropped.
    pub(crate) fn next_buffered(&mut self) -> Option<PgNotification> {
        let listener = self.listener.as_mut()?;
        while let Some(n) = listener.next_buffered() {
            if !n.payload().starts_with(PING) {
                return Some(n);
            }
        }
        None
    }

    async fn send_ping(&mut self) {
        let payload = format!("{PING}{}", Uuid::new_v4().simple());
        let sent = tokio::time::timeout(
            self.check.bound,
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(self.channel)
                .bind(&payload)
                .execute(&self.pool),
        )
        .await;
        if let Ok(Err(e)) = &sent {
            // The database itself may be down; the listener hears of that
            // on its own. A ping that never left counts as unanswered.
            tracing::debug!(error = %e, "could not send the LISTEN ping");
        }
        self.ping = Some((payload, Instant::now()));
    }

    async fn replace(&mut self) -> Result<(), sqlx::Error> {
        // The old connection is dropped; closing it may wait on the
        // frozen link, in a task of sqlx's, off this one's path.
        let listener = listen(&self.pool, self.channel, self.check.bound).await?;
        self.listener = Some(listener);
        self.heard = Instant::now();
        self.ping = None;
        Ok(())
    }
}

/// A listener on a pool of its own (one connection with `pool`'s settings):
/// a dropped listener's connection goes back to that pool, never to one
/// that others read from, and a frozen one then holds only its own pool.
async fn listen(pool: &PgPool, channel: &str, bound: Duration) -> Result<PgListener, sqlx::Error> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(bound)
        .connect_lazy_with((*pool.connect_options()).clone());
    let connect = async {
        let mut listener = PgListener::connect_with(&own).await?;
        listener.listen(channel).await?;
        Ok(listener)
    };
    match tokio::time::timeout(bound, connect).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}
