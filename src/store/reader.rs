//! The read side, written once over the [`Backend`] trait: admin queries and
//! stats on a small pool of read connections, off the writer's path. Every
//! read is bounded in time: a dead link fails it with `Unavailable`.

use std::fmt;
use std::time::Duration;

use sqlx::pool::PoolConnection;

use super::backend::Backend;
use super::common::{SubRow, ack_watermark, duration_from, oldest_unacked, peek_page};
use super::counts::{StoreGauges, SubscriptionGauges, TopicGauges};
use crate::error::{Error, Result};
use crate::model::{DeadLetter, PeekedMessage, Subscription, SubscriptionStats, Topic, now_micros};

/// How many blocked keys the stats name.
const BLOCKED_KEY_SAMPLE: i64 = 20;

/// A pool of read connections of one backend.
pub(super) struct Reader<B: Backend> {
    pool: sqlx::Pool<B::Db>,
    /// Longest one read may take, the wait for a connection included.
    timeout: Duration,
}

impl<B: Backend> Clone for Reader<B> {
    fn clone(&self) -> Self {
        Reader {
            pool: self.pool.clone(),
            timeout: self.timeout,
        }
    }
}

/// Runs `$body` (which reads on `$c`, a pooled connection) within the
/// reader's bound. A read that runs out of time leaves its connection
/// mid-statement, maybe on a dead link: it is closed rather than returned
/// to the pool, where the pool's check on return would wait on it.
macro_rules! bounded {
    ($self:ident, |$c:ident| $body:expr) => {{
        let mut conn = $self.conn().await?;
        let result = {
            let $c = &mut *conn;
            tokio::time::timeout($self.timeout, async { $body }).await
        };
        match result {
            Ok(r) => r,
            Err(_) => {
                conn.close_on_drop();
                Err($self.timed_out())
            }
        }
    }};
}

impl<B: Backend> fmt::Debug for Reader<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl<B: Backend> Reader<B> {
    /// A reader over `pool`, each read bounded by `timeout` (the pool's
    /// own acquire timeout bounds the wait for a connection).
    pub(super) fn new(pool: sqlx::Pool<B::Db>, timeout: Duration) -> Self {
        Reader { pool, timeout }
    }

    /// A read connection. Whatever stops the pool from giving one (the
    /// database refusing connections, unreachable, out of slots, a bad
    /// password after a change) is storage being unavailable, not a fault
    /// of the request: `Unavailable`, so clients retry.
    async fn conn(&self) -> Result<PoolConnection<B::Db>> {
        match tokio::time::timeout(self.timeout, self.pool.acquire()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(Error::Unavailable(format!(
                "storage refused a read connection: {e}"
            ))),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> Error {
        Error::Unavailable(format!(
            "storage did not answer a read within {:?} (commit_timeout)",
            self.timeout
        ))
    }

    /// Closes the pool, waiting at most the read bound: a connection stuck
    /// on a dead link (the PostgreSQL listener's, say) is never given back,
    /// and shutdown must not wait for it.
    pub(super) async fn close(&self) {
        if tokio::time::timeout(self.timeout, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("closing the read connections took too long; left them behind");
        }
    }

    async fn sub_row(&self, name: &str) -> Result<SubRow> {
        bounded!(self, |c| B::sub(c, name).await)?
            .ok_or_else(|| Error::NotFound(format!("subscription {name:?} does not exist")))
    }

    pub(super) async fn get_topic(&self, name: &str) -> Result<Topic> {
        let row = bounded!(self, |c| B::topic(c, name).await)?
            .ok_or_else(|| Error::NotFound(format!("topic {name:?} does not exist")))?;
        Ok(row.to_topic())
    }

    pub(super) async fn list_topics(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Topic>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = bounded!(self, |c| B::list_topics(c, after.unwrap_or(""), limit)
            .await)?;
        Ok(rows.iter().map(|r| r.to_topic()).collect())
    }

    pub(super) async fn get_subscription(&self, name: &str) -> Result<Subscription> {
        Ok(self.sub_row(name).await?.to_subscription())
    }

    pub(super) async fn list_subscriptions(
        &self,
        topic: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Subscription>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = bounded!(self, |c| B::list_subs(c, topic, after.unwrap_or(""), limit)
            .await)?;
        Ok(rows.iter().map(|r| r.to_subscription()).collect())
    }

    pub(super) async fn stats(&self, name: &str) -> Result<SubscriptionStats> {
        let sub = self.sub_row(name).await?;
        let now = now_micros();
        let (delivered, acked, redelivered, last_seq, counts, oldest_unacked_age, blocked) =
            bounded!(self, |c| {
                let (delivered, acked, redelivered, last_seq) = B::counters(c, sub.id).await?;
                let counts = B::delivery_counts(c, sub.id, now).await?;
                let oldest = match oldest_unacked(sub.cursor, last_seq, counts.first_undone) {
                    Some(seq) => B::published_at(c, sub.topic_id, seq)
                        .await?
                        .map(|at| duration_from(now - at)),
                    None => None,
                };
                let blocked = if sub.settings.ordered {
                    B::blocked_keys(c, sub.id, BLOCKED_KEY_SAMPLE).await?
                } else {
                    (0, Vec::new())
                };
                Ok((
                    delivered,
                    acked,
                    redelivered,
                    last_seq,
                    counts,
                    oldest,
                    blocked,
                ))
            })?;
        let (blocked_keys, blocked_key_sample) = blocked;
        Ok(SubscriptionStats {
            backlog: (last_seq - sub.cursor).max(0) + counts.undone,
            in_flight: counts.in_flight,
            oldest_unacked_age,
            dead_lettered: counts.dead,
            delivered,
            acked,
            redelivered,
            blocked_keys,
            blocked_key_sample,
            ack_watermark: ack_watermark(sub.cursor, counts.first_any),
        })
    }

    /// Up to `limit` messages waiting on the subscription after sequence
    /// `after`, in order, leaving everything as it was.
    pub(super) async fn peek(
        &self,
        name: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<PeekedMessage>> {
        // The cursor is read first: the writer moves it and inserts the
        // delivery rows of what it passed in one transaction, so every
        // message past it is a delivery row by the time `undone` reads, or
        // is past this cursor (`peek_page` keeps each message once).
        let sub = self.sub_row(name).await?;
        let wanted = limit;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        bounded!(self, |c| {
            let undone = B::undone(c, &sub, after, limit).await?;
            let new = B::messages_after(c, sub.topic_id, &sub.topic, after.max(sub.cursor), limit)
                .await?;
            Ok(peek_page(undone, new, wanted))
        })
    }

    /// Every topic's and subscription's gauges, in two statements whatever
    /// their number (see [`Backend::subscription_gauges`]).
    pub(super) async fn gauges(&self) -> Result<StoreGauges> {
        let now = now_micros();
        let (topics, subs) = bounded!(self, |c| {
            let topics = B::topic_gauges(&mut *c).await?;
            let subs = B::subscription_gauges(c, now).await?;
            Ok((topics, subs))
        })?;
        Ok(StoreGauges {
            topics: topics
                .into_iter()
                .map(|(name, last_seq, first_seq, expired)| TopicGauges {
                    name,
                    last_seq,
                    first_seq,
                    expired,
                })
                .collect(),
            subscriptions: subs.into_iter().map(SubscriptionGauges::from_row).collect(),
        })
    }

    pub(super) async fn list_dead_letters(
        &self,
        name: &str,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, i64)> {
        let sub = self.sub_row(name).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        bounded!(self, |c| {
            let letters = B::dead_letters(c, &sub, after, limit).await?;
            let total = B::dead_count(c, sub.id).await?;
            Ok((letters, total))
        })
    }
}
