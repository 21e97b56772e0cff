//! The read side, written once over the [`Backend`] trait: admin queries and
//! stats on a small pool of read connections, off the writer's path.

use std::fmt;

use super::backend::Backend;
use super::common::{SubRow, ack_watermark, duration_from, oldest_unacked};
use crate::error::{Error, Result};
use crate::model::{DeadLetter, Subscription, SubscriptionStats, Topic, now_micros};

/// How many blocked keys the stats name.
const BLOCKED_KEY_SAMPLE: i64 = 20;

/// A pool of read connections of one backend.
pub(super) struct Reader<B: Backend> {
    pool: sqlx::Pool<B::Db>,
}

impl<B: Backend> Clone for Reader<B> {
    fn clone(&self) -> Self {
        Reader {
            pool: self.pool.clone(),
        }
    }
}

impl<B: Backend> fmt::Debug for Reader<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl<B: Backend> Reader<B> {
    /// A reader over `pool`.
    pub(super) fn new(pool: sqlx::Pool<B::Db>) -> Self {
        Reader { pool }
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<B::Db>> {
        self.pool.acquire().await.map_err(Error::from)
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    async fn sub_row(&self, name: &str) -> Result<SubRow> {
        B::sub(&mut *self.conn().await?, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("subscription {name:?} does not exist")))
    }

    pub(super) async fn get_topic(&self, name: &str) -> Result<Topic> {
        let row = B::topic(&mut *self.conn().await?, name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("topic {name:?} does not exist")))?;
        Ok(row.to_topic())
    }

    pub(super) async fn list_topics(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Topic>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = B::list_topics(&mut *self.conn().await?, after.unwrap_or(""), limit).await?;
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
        let mut c = self.conn().await?;
        let rows = B::list_subs(&mut c, topic, after.unwrap_or(""), limit).await?;
        Ok(rows.iter().map(|r| r.to_subscription()).collect())
    }

    pub(super) async fn stats(&self, name: &str) -> Result<SubscriptionStats> {
        let sub = self.sub_row(name).await?;
        let now = now_micros();
        let mut c = self.conn().await?;
        let (delivered, acked, redelivered, last_seq) = B::counters(&mut c, sub.id).await?;
        let counts = B::delivery_counts(&mut c, sub.id, now).await?;
        let oldest_unacked_age = match oldest_unacked(sub.cursor, last_seq, counts.first_undone) {
            Some(seq) => B::published_at(&mut c, sub.topic_id, seq)
                .await?
                .map(|at| duration_from(now - at)),
            None => None,
        };
        let (blocked_keys, blocked_key_sample) = if sub.settings.ordered {
            B::blocked_keys(&mut c, sub.id, BLOCKED_KEY_SAMPLE).await?
        } else {
            (0, Vec::new())
        };
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

    pub(super) async fn list_dead_letters(
        &self,
        name: &str,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, i64)> {
        let sub = self.sub_row(name).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut c = self.conn().await?;
        let letters = B::dead_letters(&mut c, &sub, after, limit).await?;
        let total = B::dead_count(&mut c, sub.id).await?;
        Ok((letters, total))
    }
}
