//! The SQLite backend: the writer task that owns the one write connection and
//! commits queued operations in groups, and the read pool. All of SQLite's SQL
//! is in this file; the schema is in `migrations/sqlite/`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::common::{
    CHUNK, Check, Clock, DELETE_LIMIT, Done, EXPIRE_LIMIT, LEASED, SubRow, TopicRow, Touched,
    WAITING, ack_watermark, classify, current_seqs, dead_letter_attributes, decode_attributes,
    duration_from, encode_attributes, finish, oldest_unacked, status_of, uuid_from,
};
use super::{
    LeaseBatch, LeaseRequest, MaintenanceReport, NewSubscription, Notifier, Op, StoreConfig,
    SubscriptionPatch, TopicPatch,
};
use crate::error::{Error, Result};
use crate::model::{
    AckId, AckStatus, DeadLetter, Delivery, Micros, NackItem, NewMessage, PublishOutcome,
    SeekTarget, StartPosition, StoredMessage, Subscription, SubscriptionStats, Topic,
    TopicSettings, micros, now_micros,
};

/// Schema versions, applied in order at open.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/sqlite/0001_broker.sql"))];

/// Columns of `messages` read into a [`StoredMessage`], in this order.
const MESSAGE_COLUMNS: &str =
    "m.seq, m.id, m.key, m.payload, m.attributes, m.created_at, m.published_at";

fn db_err(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Error::Unavailable(format!("storage unavailable: {e}")),
        other => Error::Storage(other.to_string()),
    }
}

fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

fn values(columns: usize, rows: usize) -> String {
    let row = format!("({})", placeholders(columns));
    vec![row; rows].join(",")
}

/// Reads the [`MESSAGE_COLUMNS`] starting at column `at`.
fn message_from_row(row: &SqliteRow, at: usize, topic: &str) -> Result<StoredMessage> {
    let id: Vec<u8> = row.try_get(at + 1).map_err(db_err)?;
    Ok(StoredMessage {
        sequence: row.try_get(at).map_err(db_err)?,
        id: uuid_from(&id)?,
        topic: topic.to_owned(),
        key: row.try_get(at + 2).map_err(db_err)?,
        payload: row.try_get(at + 3).map_err(db_err)?,
        attributes: decode_attributes(row.try_get(at + 4).map_err(db_err)?)?,
        created_at: row.try_get(at + 5).map_err(db_err)?,
        published_at: row.try_get(at + 6).map_err(db_err)?,
    })
}

/// Opens the database, migrates it, and returns the writer (to be run as a
/// task) and the reader.
pub(super) async fn open(
    config: &StoreConfig,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
) -> Result<(Writer, Reader, Checkpointer)> {
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
    let path = config.data_dir.join("tidings.db");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if config.fsync {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        })
        .busy_timeout(Duration::from_secs(10))
        .statement_cache_capacity(1024)
        .pragma("cache_size", "-8192")
        .pragma("temp_store", "memory");
    // The checkpointer below copies the WAL into the database off the commit
    // path; the writer checkpoints itself only if the WAL grows past this
    // many pages (a backstop, about 80 MB).
    let writer_options = options.clone().pragma("wal_autocheckpoint", "20000");
    let mut conn = SqliteConnection::connect_with(&writer_options)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    migrate(&mut conn).await?;
    let checkpointer = SqliteConnection::connect_with(&options)
        .await
        .map_err(db_err)?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.read_only(true))
        .await
        .map_err(db_err)?;
    let writer = Writer {
        conn,
        topics: HashMap::new(),
        subs: HashMap::new(),
        clock: Clock::new(),
        dedup_window: micros(config.dedup_window),
        notifier,
        healthy,
    };
    Ok((writer, Reader { pool }, Checkpointer { conn: checkpointer }))
}

/// Copies committed WAL pages into the database file on its own connection,
/// so that commits do not wait for checkpoints.
pub(super) struct Checkpointer {
    conn: SqliteConnection,
}

impl Checkpointer {
    /// Checkpoints every `interval` until `alive` reports the store closed.
    pub(super) async fn run(mut self, alive: impl Fn() -> bool, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !alive() {
                break;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut self.conn)
                .await
            {
                tracing::warn!(error = %e, "WAL checkpoint failed; the writer's backstop will checkpoint");
            }
        }
        let _ = self.conn.close().await;
    }
}

async fn migrate(conn: &mut SqliteConnection) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS tidings_migrations \
         (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    let current: i64 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM tidings_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let mut tx = conn.begin().await.map_err(db_err)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db_err)?;
        sqlx::query("INSERT INTO tidings_migrations (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(now_micros())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(version, "applied SQLite migration");
    }
    Ok(())
}

/// A new `deliveries` row: seq, state, attempt, available_at, lease,
/// delivered_at, key.
type DeliveryRow = (i64, i64, i32, i64, i64, Option<i64>, Option<String>);

/// Owns the write connection; every write runs here, in groups.
pub(super) struct Writer {
    conn: SqliteConnection,
    topics: HashMap<String, TopicRow>,
    subs: HashMap<String, SubRow>,
    clock: Clock,
    dedup_window: i64,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
}

impl Writer {
    /// Commits queued operations in groups until the store is closed or every
    /// handle is gone.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Op>, max_batch: usize) {
        while let Some(first) = rx.recv().await {
            let mut weight = first.weight();
            let mut ops = vec![first];
            while weight < max_batch {
                match rx.try_recv() {
                    Ok(op) => {
                        weight += op.weight();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            if let Some(at) = ops.iter().position(|op| matches!(op, Op::Close(_))) {
                let mut rest = ops.split_off(at);
                self.execute(ops).await;
                let close = rest.remove(0);
                for op in rest {
                    op.refuse("storage is closed");
                }
                rx.close();
                while let Ok(op) = rx.try_recv() {
                    op.refuse("storage is closed");
                }
                if let Err(e) = self.conn.close().await {
                    tracing::warn!(error = %e, "closing the database failed");
                }
                if let Op::Close(reply) = close {
                    let _ = reply.send(Ok(()));
                }
                return;
            }
            self.execute(ops).await;
        }
    }

    async fn execute(&mut self, ops: Vec<Op>) {
        let now = self.clock.tick();
        let mut touched = Touched::default();
        let mut dones: Vec<Done> = Vec::with_capacity(ops.len());
        let mut failure = sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await
            .err()
            .map(|e| db_err(e).to_string());
        // Publishes of the whole group are stored together: a handful of
        // multi-row statements however many requests there are.
        let (publishes, mut ops): (Vec<Op>, Vec<Op>) = ops
            .into_iter()
            .partition(|op| matches!(op, Op::Publish(..)));
        if failure.is_none() && !publishes.is_empty() {
            for (done, fatal) in self.publish_group(publishes, now, &mut touched).await {
                dones.push(done);
                failure = failure.or(fatal);
            }
        } else {
            ops.extend(publishes);
        }
        for op in ops {
            if let Some(reason) = &failure {
                let reason = reason.clone();
                dones.push(Box::new(move |_| op.refuse(&reason)));
                continue;
            }
            let (done, fatal) = self.apply(op, now, &mut touched).await;
            dones.push(done);
            failure = fatal;
        }
        if failure.is_none()
            && let Err(e) = sqlx::query("COMMIT").execute(&mut self.conn).await
        {
            failure = Some(db_err(e).to_string());
        }
        match failure {
            None => {
                self.healthy
                    .send_if_modified(|h| !std::mem::replace(h, true));
                for done in dones {
                    done(None);
                }
                for topic in &touched.topics {
                    self.notifier.notify_topic(topic);
                }
                for sub in &touched.subs {
                    self.notifier.notify_subscription(sub);
                }
            }
            Some(reason) => {
                tracing::error!(error = %reason, "group commit failed; every request in it was refused");
                let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
                self.topics.clear();
                self.subs.clear();
                self.healthy
                    .send_if_modified(|h| std::mem::replace(h, false));
                for done in dones {
                    done(Some(&reason));
                }
            }
        }
    }

    async fn apply(&mut self, op: Op, now: Micros, t: &mut Touched) -> (Done, Option<String>) {
        match op {
            Op::Publish(messages, r) => finish(r, self.publish(messages, now, t).await),
            Op::CreateTopic(name, settings, r) => {
                finish(r, self.create_topic(name, settings, now).await)
            }
            Op::UpdateTopic(name, patch, r) => finish(r, self.update_topic(&name, patch).await),
            Op::DeleteTopic(name, r) => finish(r, self.delete_topic(&name).await),
            Op::CreateSubscription(sub, r) => finish(r, self.create_subscription(*sub, now).await),
            Op::UpdateSubscription(name, patch, r) => {
                finish(r, self.update_subscription(&name, *patch, t).await)
            }
            Op::DeleteSubscription(name, r) => finish(r, self.delete_subscription(&name, t).await),
            Op::Lease(req, r) => finish(r, self.lease(req, now, t).await),
            Op::Ack(sub, ids, r) => finish(r, self.ack(&sub, ids, now, t).await),
            Op::Nack(sub, items, r) => finish(r, self.nack(&sub, items, now, t).await),
            Op::Extend(sub, items, r) => finish(r, self.extend(&sub, items, now).await),
            Op::Release(sub, ids, r) => finish(r, self.release(&sub, ids, now, t).await),
            Op::Seek(sub, target, r) => finish(r, self.seek(&sub, target, t).await),
            Op::Redrive(sub, seqs, r) => finish(r, self.redrive(&sub, seqs, now, t).await),
            Op::Purge(sub, seqs, r) => finish(r, self.purge(&sub, seqs).await),
            Op::Maintain(r) => finish(r, self.maintain(now, t).await),
            // Close is handled by `run` before a batch is applied.
            Op::Close(r) => finish(r, Ok(())),
        }
    }

    async fn topic(&mut self, name: &str) -> Result<TopicRow> {
        if let Some(row) = self.topics.get(name) {
            return Ok(row.clone());
        }
        let sql = format!("SELECT {} FROM topics WHERE name = ?", TopicRow::COLUMNS);
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("topic {name:?} does not exist")))?;
        let row = TopicRow::from_row(&row)?;
        self.topics.insert(name.to_owned(), row.clone());
        Ok(row)
    }

    async fn sub(&mut self, name: &str) -> Result<SubRow> {
        if let Some(row) = self.subs.get(name) {
            return Ok(row.clone());
        }
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = ?",
            SubRow::COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("subscription {name:?} does not exist")))?;
        let row = SubRow::from_row(&row)?;
        self.subs.insert(name.to_owned(), row.clone());
        Ok(row)
    }

    /// Runs each statement with `id` as its one parameter.
    async fn run_with_id(&mut self, statements: &[&'static str], id: i64) -> Result<()> {
        for &sql in statements {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
        }
        Ok(())
    }

    /// Notes that a waiting or leased row of `sub` falls due at `at`.
    fn due_at(&mut self, sub: &str, at: Micros) {
        if let Some(cached) = self.subs.get_mut(sub) {
            cached.check_at = cached.check_at.min(at);
        }
    }

    // ---- publishing ----

    async fn publish(
        &mut self,
        messages: Vec<NewMessage>,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<PublishOutcome>> {
        // Every topic is checked before anything is written, so a batch with
        // an unknown topic stores nothing.
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match groups.iter_mut().find(|(topic, _)| *topic == m.topic) {
                Some((_, indexes)) => indexes.push(i),
                None => {
                    self.topic(&m.topic).await?;
                    groups.push((m.topic.clone(), vec![i]));
                }
            }
        }
        let mut outcomes = vec![None; messages.len()];
        for (topic, indexes) in groups {
            let batch: Vec<&NewMessage> = indexes.iter().map(|&i| &messages[i]).collect();
            let results = self.publish_to(&topic, &batch, now).await?;
            for (i, outcome) in indexes.into_iter().zip(results) {
                outcomes[i] = Some(outcome);
            }
            t.topics.insert(topic);
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Publishes several requests as one: requests naming an unknown topic
    /// are refused on their own, the others are stored together.
    async fn publish_group(
        &mut self,
        ops: Vec<Op>,
        now: Micros,
        t: &mut Touched,
    ) -> Vec<(Done, Option<String>)> {
        let mut out = Vec::with_capacity(ops.len());
        let mut accepted = Vec::with_capacity(ops.len());
        let mut all = Vec::new();
        for op in ops {
            let Op::Publish(messages, reply) = op else {
                continue;
            };
            let mut missing = None;
            for m in &messages {
                if let Err(e) = self.topic(&m.topic).await {
                    missing = Some(e);
                    break;
                }
            }
            match missing {
                Some(e) => out.push(finish(reply, Err(e))),
                None => {
                    accepted.push((messages.len(), reply));
                    all.extend(messages);
                }
            }
        }
        match self.publish(all, now, t).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for (n, reply) in accepted {
                    out.push(finish(reply, Ok(outcomes.by_ref().take(n).collect())));
                }
            }
            Err(e) => {
                for (_, reply) in accepted {
                    out.push(finish(reply, Err(e.clone())));
                }
            }
        }
        out
    }

    /// Stores the messages of one topic that it has not seen yet.
    async fn publish_to(
        &mut self,
        topic: &str,
        messages: &[&NewMessage],
        now: Micros,
    ) -> Result<Vec<PublishOutcome>> {
        let row = self.topic(topic).await?;
        let mut known: HashMap<Uuid, i64> = HashMap::new();
        for chunk in messages.chunks(CHUNK) {
            let sql = format!(
                "SELECT id, seq FROM dedup WHERE topic_id = ? AND id IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(row.id);
            for m in chunk {
                q = q.bind(m.id.as_bytes().to_vec());
            }
            for r in q.fetch_all(&mut self.conn).await.map_err(db_err)? {
                let id: Vec<u8> = r.try_get(0).map_err(db_err)?;
                known.insert(uuid_from(&id)?, r.try_get(1).map_err(db_err)?);
            }
        }
        let mut seq = row.last_seq;
        let mut fresh: Vec<(&NewMessage, i64)> = Vec::new();
        let mut outcomes = Vec::with_capacity(messages.len());
        for &m in messages {
            match known.get(&m.id) {
                Some(&sequence) => outcomes.push(PublishOutcome {
                    id: m.id,
                    sequence,
                    duplicate: true,
                }),
                None => {
                    seq += 1;
                    known.insert(m.id, seq);
                    fresh.push((m, seq));
                    outcomes.push(PublishOutcome {
                        id: m.id,
                        sequence: seq,
                        duplicate: false,
                    });
                }
            }
        }
        if fresh.is_empty() {
            return Ok(outcomes);
        }
        for chunk in fresh.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO messages (topic_id, seq, id, key, payload, attributes, created_at, \
                 published_at) VALUES {}",
                values(8, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (m, seq) in chunk {
                q = q
                    .bind(row.id)
                    .bind(*seq)
                    .bind(m.id.as_bytes().to_vec())
                    .bind(m.key.clone())
                    .bind(m.payload.clone())
                    .bind(encode_attributes(&m.attributes))
                    .bind(m.created_at)
                    .bind(now);
            }
            q.execute(&mut self.conn).await.map_err(db_err)?;
            let sql = format!(
                "INSERT INTO dedup (topic_id, id, seq, published_at) VALUES {}",
                values(4, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (m, seq) in chunk {
                q = q
                    .bind(row.id)
                    .bind(m.id.as_bytes().to_vec())
                    .bind(*seq)
                    .bind(now);
            }
            q.execute(&mut self.conn).await.map_err(db_err)?;
        }
        sqlx::query("UPDATE topics SET last_seq = ? WHERE id = ?")
            .bind(seq)
            .bind(row.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        if let Some(cached) = self.topics.get_mut(topic) {
            cached.last_seq = seq;
        }
        Ok(outcomes)
    }

    // ---- topics and subscriptions ----

    async fn create_topic(
        &mut self,
        name: String,
        settings: TopicSettings,
        now: Micros,
    ) -> Result<Topic> {
        match self.topic(&name).await {
            Ok(_) => {
                return Err(Error::AlreadyExists(format!(
                    "topic {name:?} already exists"
                )));
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        sqlx::query(
            "INSERT INTO topics (name, created_at, retention_us, max_age_us) VALUES (?, ?, ?, ?)",
        )
        .bind(&name)
        .bind(now)
        .bind(micros(settings.retention))
        .bind(micros(settings.max_age))
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        Ok(self.topic(&name).await?.to_topic())
    }

    async fn update_topic(&mut self, name: &str, patch: TopicPatch) -> Result<Topic> {
        let row = self.topic(name).await?;
        sqlx::query("UPDATE topics SET retention_us = ?, max_age_us = ? WHERE id = ?")
            .bind(patch.retention.map(micros).unwrap_or(row.retention_us))
            .bind(patch.max_age.map(micros).unwrap_or(row.max_age_us))
            .bind(row.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        self.topics.remove(name);
        Ok(self.topic(name).await?.to_topic())
    }

    async fn delete_topic(&mut self, name: &str) -> Result<()> {
        let row = self.topic(name).await?;
        let subs: Vec<String> =
            sqlx::query_scalar("SELECT name FROM subscriptions WHERE topic_id = ? ORDER BY name")
                .bind(row.id)
                .fetch_all(&mut self.conn)
                .await
                .map_err(db_err)?;
        if !subs.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "topic {name:?} still has {} subscription(s) ({}); delete them first",
                subs.len(),
                subs.join(", ")
            )));
        }
        self.run_with_id(
            &[
                "DELETE FROM messages WHERE topic_id = ?",
                "DELETE FROM dedup WHERE topic_id = ?",
                "DELETE FROM topics WHERE id = ?",
            ],
            row.id,
        )
        .await?;
        self.topics.remove(name);
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    async fn check_dead_letter_topic(&mut self, topic: &str, dlt: Option<&str>) -> Result<()> {
        let Some(dlt) = dlt else { return Ok(()) };
        if dlt == topic {
            return Err(Error::InvalidArgument(format!(
                "dead-letter topic {dlt:?} is the subscription's own topic"
            )));
        }
        match self.topic(dlt).await {
            Err(Error::NotFound(_)) => Err(Error::NotFound(format!(
                "dead-letter topic {dlt:?} does not exist"
            ))),
            other => other.map(|_| ()),
        }
    }

    async fn first_seq_at(&mut self, topic: &TopicRow, time: Micros) -> Result<i64> {
        let seq: Option<i64> = sqlx::query_scalar(
            "SELECT min(seq) FROM messages WHERE topic_id = ? AND published_at >= ?",
        )
        .bind(topic.id)
        .bind(time)
        .fetch_one(&mut self.conn)
        .await
        .map_err(db_err)?;
        Ok(seq.unwrap_or(topic.last_seq + 1))
    }

    async fn create_subscription(
        &mut self,
        sub: NewSubscription,
        now: Micros,
    ) -> Result<Subscription> {
        match self.sub(&sub.name).await {
            Ok(_) => {
                return Err(Error::AlreadyExists(format!(
                    "subscription {:?} already exists",
                    sub.name
                )));
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let topic = self.topic(&sub.topic).await?;
        self.check_dead_letter_topic(&sub.topic, sub.settings.dead_letter_topic.as_deref())
            .await?;
        let cursor = match sub.start {
            StartPosition::Earliest => 0,
            StartPosition::Latest => topic.last_seq,
            StartPosition::Time(time) => self.first_seq_at(&topic, time).await? - 1,
        };
        let s = &sub.settings;
        sqlx::query(
            "INSERT INTO subscriptions (name, topic_id, created_at, ack_deadline_us, max_attempts, \
             min_backoff_us, max_backoff_us, dead_letter_topic, ordered, cursor) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&sub.name)
        .bind(topic.id)
        .bind(now)
        .bind(micros(s.ack_deadline))
        .bind(s.max_attempts)
        .bind(micros(s.min_backoff))
        .bind(micros(s.max_backoff))
        .bind(s.dead_letter_topic.clone())
        .bind(s.ordered)
        .bind(cursor)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        Ok(self.sub(&sub.name).await?.to_subscription())
    }

    async fn update_subscription(
        &mut self,
        name: &str,
        patch: SubscriptionPatch,
        t: &mut Touched,
    ) -> Result<Subscription> {
        let row = self.sub(name).await?;
        let mut s = row.settings.clone();
        if let Some(v) = patch.ack_deadline {
            s.ack_deadline = v;
        }
        if let Some(v) = patch.max_attempts {
            s.max_attempts = v;
        }
        if let Some(v) = patch.min_backoff {
            s.min_backoff = v;
        }
        if let Some(v) = patch.max_backoff {
            s.max_backoff = v;
        }
        if let Some(v) = patch.dead_letter_topic {
            s.dead_letter_topic = v;
        }
        if let Some(v) = patch.ordered {
            s.ordered = v;
        }
        if s.min_backoff > s.max_backoff {
            return Err(Error::InvalidArgument(format!(
                "min_backoff ({:?}) is longer than max_backoff ({:?})",
                s.min_backoff, s.max_backoff
            )));
        }
        self.check_dead_letter_topic(&row.topic, s.dead_letter_topic.as_deref())
            .await?;
        sqlx::query(
            "UPDATE subscriptions SET ack_deadline_us = ?, max_attempts = ?, min_backoff_us = ?, \
             max_backoff_us = ?, dead_letter_topic = ?, ordered = ? WHERE id = ?",
        )
        .bind(micros(s.ack_deadline))
        .bind(s.max_attempts)
        .bind(micros(s.min_backoff))
        .bind(micros(s.max_backoff))
        .bind(s.dead_letter_topic.clone())
        .bind(s.ordered)
        .bind(row.id)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        self.subs.remove(name);
        t.subs.insert(name.to_owned());
        Ok(self.sub(name).await?.to_subscription())
    }

    async fn delete_subscription(&mut self, name: &str, t: &mut Touched) -> Result<()> {
        let row = self.sub(name).await?;
        self.run_with_id(
            &[
                "DELETE FROM deliveries WHERE sub_id = ?",
                "DELETE FROM subscriptions WHERE id = ?",
            ],
            row.id,
        )
        .await?;
        self.subs.remove(name);
        t.subs.insert(name.to_owned());
        tracing::info!(subscription = name, "subscription deleted");
        Ok(())
    }

    // ---- leasing ----

    async fn lease(
        &mut self,
        req: LeaseRequest,
        now: Micros,
        t: &mut Touched,
    ) -> Result<LeaseBatch> {
        let sub = self.sub(&req.subscription).await?;
        let ordered = sub.settings.ordered;
        // Waiting messages of an ordered subscription may be due but held
        // back by their key, so those always look.
        let look = ordered || now >= sub.check_at;
        let expired = if look {
            self.expire(&sub, now).await?
        } else {
            0
        };
        if expired > 0 {
            t.subs.insert(sub.name.clone());
        }
        let deadline = now.saturating_add(micros(sub.settings.ack_deadline));
        let mut batch = LeaseBatch::default();
        let mut bytes = 0usize;
        let mut redelivered = 0i64;

        // Redeliveries that are due come first. On an ordered subscription
        // only the oldest waiting message of each key qualifies.
        let due_sql = if ordered {
            format!(
                "SELECT d.attempt, {MESSAGE_COLUMNS} FROM deliveries d \
                 JOIN messages m ON m.topic_id = ?3 AND m.seq = d.seq \
                 WHERE d.sub_id = ?1 AND d.state = 0 AND d.available_at <= ?2 \
                 AND (d.key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e \
                   WHERE e.sub_id = d.sub_id AND e.key = d.key AND e.seq < d.seq \
                   AND e.state IN (0, 1))) \
                 ORDER BY d.seq LIMIT ?4"
            )
        } else {
            format!(
                "SELECT d.attempt, {MESSAGE_COLUMNS} FROM deliveries d \
                 JOIN messages m ON m.topic_id = ?3 AND m.seq = d.seq \
                 WHERE d.sub_id = ?1 AND d.state = 0 AND d.available_at <= ?2 \
                 ORDER BY d.available_at LIMIT ?4"
            )
        };
        let rows = if look {
            sqlx::query(AssertSqlSafe(due_sql))
                .bind(sub.id)
                .bind(now)
                .bind(sub.topic_id)
                .bind(req.max_messages as i64)
                .fetch_all(&mut self.conn)
                .await
                .map_err(db_err)?
        } else {
            Vec::new()
        };
        let due_found = rows.len();
        for row in rows {
            let message = message_from_row(&row, 1, &sub.topic)?;
            if !batch.deliveries.is_empty() && bytes + message.payload.len() > req.max_bytes {
                break;
            }
            let attempt: i32 = row.try_get::<i32, _>(0).map_err(db_err)? + 1;
            let token = self.clock.token();
            sqlx::query(
                "UPDATE deliveries SET state = 1, attempt = ?, available_at = ?, lease = ?, \
                 first_delivery_at = coalesce(first_delivery_at, ?), last_delivery_at = ?, \
                 reason = NULL WHERE sub_id = ? AND seq = ?",
            )
            .bind(attempt)
            .bind(deadline)
            .bind(token)
            .bind(now)
            .bind(now)
            .bind(sub.id)
            .bind(message.sequence)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            if attempt > 1 {
                redelivered += 1;
            }
            bytes += message.payload.len();
            batch.deliveries.push(Delivery {
                ack_id: AckId {
                    subscription: sub.id,
                    sequence: message.sequence,
                    token,
                },
                message,
                attempt,
                lease_deadline: deadline,
            });
        }

        // Then new messages from the topic's log, past the cursor.
        let room = req.max_messages.saturating_sub(batch.deliveries.len());
        let mut cursor = sub.cursor;
        if room > 0 && bytes < req.max_bytes {
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = ? AND m.seq > ? \
                 ORDER BY m.seq LIMIT ?"
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(sub.topic_id)
                .bind(sub.cursor)
                .bind(room as i64)
                .fetch_all(&mut self.conn)
                .await
                .map_err(db_err)?;
            let mut messages = Vec::with_capacity(rows.len());
            for row in &rows {
                messages.push(message_from_row(row, 0, &sub.topic)?);
            }
            let mut blocked = if ordered {
                self.keys_in_progress(&sub, &messages).await?
            } else {
                HashSet::new()
            };
            let mut inserts: Vec<DeliveryRow> = Vec::with_capacity(messages.len());
            for message in messages {
                let held = ordered && message.key.as_ref().is_some_and(|k| blocked.contains(k));
                if !held
                    && !batch.deliveries.is_empty()
                    && bytes + message.payload.len() > req.max_bytes
                {
                    break;
                }
                cursor = message.sequence;
                let key = if ordered { message.key.clone() } else { None };
                if held {
                    inserts.push((message.sequence, WAITING, 0, 0, 0, None, key));
                    continue;
                }
                if let Some(k) = &key {
                    blocked.insert(k.clone());
                }
                let token = self.clock.token();
                inserts.push((message.sequence, LEASED, 1, deadline, token, Some(now), key));
                bytes += message.payload.len();
                batch.deliveries.push(Delivery {
                    ack_id: AckId {
                        subscription: sub.id,
                        sequence: message.sequence,
                        token,
                    },
                    message,
                    attempt: 1,
                    lease_deadline: deadline,
                });
            }
            for chunk in inserts.chunks(CHUNK) {
                let sql = format!(
                    "INSERT INTO deliveries (sub_id, seq, state, attempt, available_at, lease, \
                     first_delivery_at, last_delivery_at, key) VALUES {}",
                    values(9, chunk.len())
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for (seq, state, attempt, available_at, lease, at, key) in chunk {
                    q = q
                        .bind(sub.id)
                        .bind(*seq)
                        .bind(*state)
                        .bind(*attempt)
                        .bind(*available_at)
                        .bind(*lease)
                        .bind(*at)
                        .bind(*at)
                        .bind(key.clone());
                }
                q.execute(&mut self.conn).await.map_err(db_err)?;
            }
        }
        let delivered = batch.deliveries.len() as i64;
        if cursor != sub.cursor || delivered > 0 {
            sqlx::query(
                "UPDATE subscriptions SET cursor = ?, delivered = delivered + ?, \
                 redelivered = redelivered + ? WHERE id = ?",
            )
            .bind(cursor)
            .bind(delivered)
            .bind(redelivered)
            .bind(sub.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            if let Some(cached) = self.subs.get_mut(&sub.name) {
                cached.cursor = cursor;
            }
            batch.progressed = cursor != sub.cursor;
        }
        let mut check_at = sub.check_at;
        if look {
            // Every due row was leased: the next one falls due later.
            let all_taken = expired < EXPIRE_LIMIT
                && due_found < req.max_messages
                && batch.deliveries.len() == due_found;
            check_at = if all_taken {
                let next: Option<i64> = sqlx::query_scalar(
                    "SELECT min(available_at) FROM deliveries \
                     WHERE sub_id = ? AND state IN (0, 1) AND available_at > ?",
                )
                .bind(sub.id)
                .bind(now)
                .fetch_one(&mut self.conn)
                .await
                .map_err(db_err)?;
                next.unwrap_or(i64::MAX)
            } else {
                // Some due rows were left for the next call.
                i64::MIN
            };
        }
        if !batch.deliveries.is_empty() {
            check_at = check_at.min(deadline);
        }
        if let Some(cached) = self.subs.get_mut(&sub.name) {
            cached.check_at = check_at;
        }
        batch.next_due = (check_at != i64::MAX && check_at != i64::MIN).then_some(check_at);
        Ok(batch)
    }

    /// The keys among `messages` that have an earlier message waiting or
    /// leased on this (ordered) subscription.
    async fn keys_in_progress(
        &mut self,
        sub: &SubRow,
        messages: &[StoredMessage],
    ) -> Result<HashSet<String>> {
        let keys: Vec<&String> = messages
            .iter()
            .filter_map(|m| m.key.as_ref())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut blocked = HashSet::new();
        for chunk in keys.chunks(CHUNK) {
            let sql = format!(
                "SELECT DISTINCT key FROM deliveries WHERE sub_id = ? AND state IN (0, 1) \
                 AND key IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql)).bind(sub.id);
            for k in chunk {
                q = q.bind((*k).clone());
            }
            blocked.extend(q.fetch_all(&mut self.conn).await.map_err(db_err)?);
        }
        Ok(blocked)
    }

    /// Ends the leases of `sub` whose deadline passed: each waits for a
    /// backoff, or is dead-lettered after its last attempt.
    async fn expire(&mut self, sub: &SubRow, now: Micros) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT seq, attempt, available_at FROM deliveries \
             WHERE sub_id = ? AND state = 1 AND available_at <= ? LIMIT ?",
        )
        .bind(sub.id)
        .bind(now)
        .bind(EXPIRE_LIMIT as i64)
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err)?;
        let expired = rows.len() as u64;
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(db_err)?;
            let attempt: i32 = row.try_get(1).map_err(db_err)?;
            let deadline: i64 = row.try_get(2).map_err(db_err)?;
            if attempt >= sub.settings.max_attempts {
                let reason = format!("lease expired on attempt {attempt}");
                self.dead_letter(sub, seq, &reason, now).await?;
            } else {
                let at = deadline.saturating_add(micros(sub.settings.backoff(attempt)));
                sqlx::query(
                    "UPDATE deliveries SET state = 0, available_at = ?, \
                     reason = 'lease expired' WHERE sub_id = ? AND seq = ?",
                )
                .bind(at)
                .bind(sub.id)
                .bind(seq)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
                self.due_at(&sub.name, at);
            }
        }
        Ok(expired)
    }

    async fn dead_letter(
        &mut self,
        sub: &SubRow,
        seq: i64,
        reason: &str,
        now: Micros,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE deliveries SET state = 2, available_at = ?, reason = ? \
             WHERE sub_id = ? AND seq = ?",
        )
        .bind(now)
        .bind(reason)
        .bind(sub.id)
        .bind(seq)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        tracing::info!(subscription = %sub.name, sequence = seq, reason, "message dead-lettered");
        let Some(dlt) = sub.settings.dead_letter_topic.clone() else {
            return Ok(());
        };
        let sql =
            format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = ? AND m.seq = ?");
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(sub.topic_id)
            .bind(seq)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err)?
        else {
            return Ok(());
        };
        let original = message_from_row(&row, 0, &sub.topic)?;
        let attributes =
            dead_letter_attributes(original.attributes, reason, seq, &sub.name, &sub.topic);
        let copy = NewMessage {
            id: original.id,
            topic: dlt.clone(),
            key: original.key,
            payload: original.payload,
            attributes,
            created_at: original.created_at,
        };
        match self.publish_to(&dlt, &[&copy], now).await {
            Ok(_) => self.notifier.notify_topic(&dlt),
            Err(Error::NotFound(_)) => tracing::warn!(
                subscription = %sub.name,
                dead_letter_topic = %dlt,
                "dead-letter topic is gone; the dead letter is kept on the subscription only"
            ),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Checks leases against the stored deliveries.
    async fn check(&mut self, sub: &SubRow, ids: &[AckId], now: Micros) -> Result<Vec<Check>> {
        let mut rows: HashMap<i64, (i64, i64, i64, i32)> = HashMap::new();
        let ours: Vec<i64> = ids
            .iter()
            .filter(|id| id.subscription == sub.id)
            .map(|id| id.sequence)
            .collect();
        for chunk in ours.chunks(CHUNK) {
            let sql = format!(
                "SELECT seq, state, lease, available_at, attempt FROM deliveries \
                 WHERE sub_id = ? AND seq IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(sub.id);
            for seq in chunk {
                q = q.bind(*seq);
            }
            for r in q.fetch_all(&mut self.conn).await.map_err(db_err)? {
                rows.insert(
                    r.try_get(0).map_err(db_err)?,
                    (
                        r.try_get(1).map_err(db_err)?,
                        r.try_get(2).map_err(db_err)?,
                        r.try_get(3).map_err(db_err)?,
                        r.try_get(4).map_err(db_err)?,
                    ),
                );
            }
        }
        Ok(classify(&sub.name, sub.id, ids, &rows, now))
    }

    async fn ack(
        &mut self,
        sub: &str,
        ids: Vec<AckId>,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<AckStatus>> {
        let sub = self.sub(sub).await?;
        let checks = self.check(&sub, &ids, now).await?;
        let current = current_seqs(&checks);
        for chunk in current.chunks(CHUNK) {
            let sql = format!(
                "DELETE FROM deliveries WHERE sub_id = ? AND seq IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(sub.id);
            for seq in chunk {
                q = q.bind(*seq);
            }
            q.execute(&mut self.conn).await.map_err(db_err)?;
        }
        if !current.is_empty() {
            sqlx::query("UPDATE subscriptions SET acked = acked + ? WHERE id = ?")
                .bind(current.len() as i64)
                .bind(sub.id)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
            // An ack unblocks the next message of its key.
            if sub.settings.ordered {
                t.subs.insert(sub.name.clone());
            }
        }
        Ok(checks.into_iter().map(status_of).collect())
    }

    async fn nack(
        &mut self,
        sub: &str,
        items: Vec<NackItem>,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<AckStatus>> {
        let sub = self.sub(sub).await?;
        let ids: Vec<AckId> = items.iter().map(|n| n.ack_id).collect();
        let checks = self.check(&sub, &ids, now).await?;
        for (check, item) in checks.iter().zip(&items) {
            let Check::Current { seq, attempt } = *check else {
                continue;
            };
            if attempt >= sub.settings.max_attempts {
                let reason = if item.reason.is_empty() {
                    format!("nacked on attempt {attempt}")
                } else {
                    item.reason.clone()
                };
                self.dead_letter(&sub, seq, &reason, now).await?;
            } else {
                let delay = item.delay.unwrap_or_else(|| sub.settings.backoff(attempt));
                let at = now.saturating_add(micros(delay));
                self.due_at(&sub.name, at);
                sqlx::query(
                    "UPDATE deliveries SET state = 0, available_at = ?, reason = ? \
                     WHERE sub_id = ? AND seq = ?",
                )
                .bind(at)
                .bind(&item.reason)
                .bind(sub.id)
                .bind(seq)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
            }
            t.subs.insert(sub.name.clone());
        }
        Ok(checks.into_iter().map(status_of).collect())
    }

    async fn extend(
        &mut self,
        sub: &str,
        items: Vec<(AckId, Duration)>,
        now: Micros,
    ) -> Result<Vec<AckStatus>> {
        let sub = self.sub(sub).await?;
        let ids: Vec<AckId> = items.iter().map(|(id, _)| *id).collect();
        let checks = self.check(&sub, &ids, now).await?;
        let mut out = Vec::with_capacity(checks.len());
        for (check, (_, extension)) in checks.into_iter().zip(&items) {
            let Check::Current { seq, .. } = check else {
                out.push(status_of(check));
                continue;
            };
            let deadline = now.saturating_add(micros(*extension));
            sqlx::query("UPDATE deliveries SET available_at = ? WHERE sub_id = ? AND seq = ?")
                .bind(deadline)
                .bind(sub.id)
                .bind(seq)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
            out.push(AckStatus::Ok(Some(deadline)));
        }
        Ok(out)
    }

    async fn release(
        &mut self,
        sub: &str,
        ids: Vec<AckId>,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<AckStatus>> {
        let sub = self.sub(sub).await?;
        let checks = self.check(&sub, &ids, now).await?;
        for check in &checks {
            let Check::Current { seq, .. } = *check else {
                continue;
            };
            sqlx::query(
                "UPDATE deliveries SET state = 0, available_at = ? WHERE sub_id = ? AND seq = ?",
            )
            .bind(now)
            .bind(sub.id)
            .bind(seq)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            self.due_at(&sub.name, now);
            t.subs.insert(sub.name.clone());
        }
        Ok(checks.into_iter().map(status_of).collect())
    }

    // ---- cursor and dead letters ----

    async fn seek(&mut self, sub: &str, target: SeekTarget, t: &mut Touched) -> Result<i64> {
        let row = self.sub(sub).await?;
        let topic = self.topic(&row.topic).await?;
        let next = match target {
            SeekTarget::Sequence(seq) => seq.clamp(1, topic.last_seq + 1),
            SeekTarget::Time(time) => self.first_seq_at(&topic, time).await?,
        };
        // Messages before the target count as acked; leases and waiting
        // redeliveries go, and dead letters from the target on are replayed.
        sqlx::query("DELETE FROM deliveries WHERE sub_id = ? AND (state IN (0, 1) OR seq >= ?)")
            .bind(row.id)
            .bind(next)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        sqlx::query("UPDATE subscriptions SET cursor = ? WHERE id = ?")
            .bind(next - 1)
            .bind(row.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        self.subs.remove(sub);
        t.subs.insert(sub.to_owned());
        tracing::info!(
            subscription = sub,
            next_sequence = next,
            "subscription seeked"
        );
        Ok(next)
    }

    async fn redrive(
        &mut self,
        sub: &str,
        seqs: Vec<i64>,
        now: Micros,
        t: &mut Touched,
    ) -> Result<i64> {
        let row = self.sub(sub).await?;
        let sql = "UPDATE deliveries SET state = 0, attempt = 0, available_at = ?, reason = NULL \
                   WHERE sub_id = ? AND state = 2";
        let count = self.for_dead(sql, Some(now), row.id, &seqs).await?;
        self.due_at(sub, now);
        t.subs.insert(sub.to_owned());
        tracing::info!(subscription = sub, count, "dead letters redriven");
        Ok(count)
    }

    async fn purge(&mut self, sub: &str, seqs: Option<Vec<i64>>) -> Result<i64> {
        let row = self.sub(sub).await?;
        let sql = "DELETE FROM deliveries WHERE sub_id = ? AND state = 2";
        let count = self
            .for_dead(sql, None, row.id, seqs.as_deref().unwrap_or(&[]))
            .await?;
        tracing::warn!(subscription = sub, count, "dead letters purged");
        Ok(count)
    }

    /// Runs `sql` (binding `now` first if given, then the subscription id)
    /// on all dead letters, or only those in `seqs` if it is not empty.
    async fn for_dead(
        &mut self,
        sql: &str,
        now: Option<Micros>,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<i64> {
        let run = |extra: String| {
            let mut q = sqlx::query(AssertSqlSafe(format!("{sql}{extra}")));
            if let Some(now) = now {
                q = q.bind(now);
            }
            q.bind(sub_id)
        };
        if seqs.is_empty() {
            let done = run(String::new())
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
            return Ok(done.rows_affected() as i64);
        }
        let mut count = 0;
        for chunk in seqs.chunks(CHUNK) {
            let mut q = run(format!(" AND seq IN ({})", placeholders(chunk.len())));
            for seq in chunk {
                q = q.bind(*seq);
            }
            count += q
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?
                .rows_affected() as i64;
        }
        Ok(count)
    }

    // ---- maintenance ----

    async fn maintain(&mut self, now: Micros, t: &mut Touched) -> Result<MaintenanceReport> {
        let mut report = MaintenanceReport::default();
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM subscriptions")
            .fetch_all(&mut self.conn)
            .await
            .map_err(db_err)?;
        for name in names {
            let sub = self.sub(&name).await?;
            if now < sub.check_at {
                continue;
            }
            let expired = self.expire(&sub, now).await?;
            report.more |= expired >= EXPIRE_LIMIT;
            if expired > 0 {
                report.leases_expired += expired;
                t.subs.insert(name);
            }
        }
        let sql = format!("SELECT {} FROM topics", TopicRow::COLUMNS);
        let topics = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&mut self.conn)
            .await
            .map_err(db_err)?;
        for row in topics {
            let topic = TopicRow::from_row(&row)?;
            let low: Option<i64> = sqlx::query_scalar(
                "SELECT min(min(coalesce((SELECT min(seq) FROM deliveries d \
                 WHERE d.sub_id = s.id), s.cursor + 1), s.cursor + 1)) \
                 FROM subscriptions s WHERE s.topic_id = ?",
            )
            .bind(topic.id)
            .fetch_one(&mut self.conn)
            .await
            .map_err(db_err)?;
            let low = low.unwrap_or(topic.last_seq + 1);
            if topic.max_age_us > 0 {
                let expired = self
                    .expire_old(&topic, low, now - topic.max_age_us, t)
                    .await?;
                report.expired += expired;
            }
            let deleted = sqlx::query(
                "DELETE FROM messages WHERE topic_id = ?1 AND seq IN (SELECT seq FROM messages \
                 WHERE topic_id = ?1 AND seq < ?2 AND published_at <= ?3 ORDER BY seq LIMIT ?4)",
            )
            .bind(topic.id)
            .bind(low)
            .bind(now - topic.retention_us)
            .bind(DELETE_LIMIT as i64)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            report.deleted += deleted.rows_affected();
            report.more |= deleted.rows_affected() >= DELETE_LIMIT;
        }
        let pruned = sqlx::query(
            "DELETE FROM dedup WHERE (topic_id, id) IN \
             (SELECT topic_id, id FROM dedup WHERE published_at < ? LIMIT ?)",
        )
        .bind(now - self.dedup_window)
        .bind(DELETE_LIMIT as i64)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        report.dedup_pruned = pruned.rows_affected();
        report.more |= report.dedup_pruned >= DELETE_LIMIT;
        Ok(report)
    }

    /// Expires the messages of `topic` published before `cutoff`, in every
    /// subscription; counts and logs those someone had not acked yet.
    async fn expire_old(
        &mut self,
        topic: &TopicRow,
        low: i64,
        cutoff: Micros,
        t: &mut Touched,
    ) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT seq, published_at FROM messages WHERE topic_id = ? ORDER BY seq LIMIT 10000",
        )
        .bind(topic.id)
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err)?;
        let mut last = None;
        let mut unacked = 0u64;
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(db_err)?;
            let published_at: i64 = row.try_get(1).map_err(db_err)?;
            if published_at >= cutoff {
                break;
            }
            last = Some(seq);
            if seq >= low {
                unacked += 1;
            }
        }
        let Some(last) = last else { return Ok(0) };
        if unacked == 0 {
            return Ok(0);
        }
        sqlx::query("DELETE FROM messages WHERE topic_id = ? AND seq <= ?")
            .bind(topic.id)
            .bind(last)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        sqlx::query(
            "DELETE FROM deliveries WHERE seq <= ?2 AND sub_id IN \
             (SELECT id FROM subscriptions WHERE topic_id = ?1)",
        )
        .bind(topic.id)
        .bind(last)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        sqlx::query("UPDATE subscriptions SET cursor = max(cursor, ?) WHERE topic_id = ?")
            .bind(last)
            .bind(topic.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        sqlx::query("UPDATE topics SET expired_count = expired_count + ? WHERE id = ?")
            .bind(unacked as i64)
            .bind(topic.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        self.topics.remove(&topic.name);
        let affected: Vec<String> = self
            .subs
            .values()
            .filter(|s| s.topic_id == topic.id)
            .map(|s| s.name.clone())
            .collect();
        for name in affected {
            self.subs.remove(&name);
            t.subs.insert(name);
        }
        tracing::warn!(
            topic = %topic.name,
            count = unacked,
            up_to_sequence = last,
            "unacked messages expired by the topic's max age"
        );
        Ok(unacked)
    }
}

/// The read side: a pool of read-only connections for admin queries.
#[derive(Debug, Clone)]
pub(super) struct Reader {
    pool: SqlitePool,
}

impl Reader {
    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    async fn sub_row(&self, name: &str) -> Result<SubRow> {
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = ?",
            SubRow::COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("subscription {name:?} does not exist")))?;
        SubRow::from_row(&row)
    }

    pub(super) async fn get_topic(&self, name: &str) -> Result<Topic> {
        let sql = format!("SELECT {} FROM topics WHERE name = ?", TopicRow::COLUMNS);
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("topic {name:?} does not exist")))?;
        Ok(TopicRow::from_row(&row)?.to_topic())
    }

    pub(super) async fn list_topics(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Topic>> {
        let sql = format!(
            "SELECT {} FROM topics WHERE name > ? ORDER BY name LIMIT ?",
            TopicRow::COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after.unwrap_or(""))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| Ok(TopicRow::from_row(r)?.to_topic()))
            .collect()
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
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id \
             WHERE s.name > ? AND (? IS NULL OR t.name = ?) ORDER BY s.name LIMIT ?",
            SubRow::COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after.unwrap_or(""))
            .bind(topic)
            .bind(topic)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| Ok(SubRow::from_row(r)?.to_subscription()))
            .collect()
    }

    pub(super) async fn stats(&self, name: &str) -> Result<SubscriptionStats> {
        let sub = self.sub_row(name).await?;
        let now = now_micros();
        let row = sqlx::query(
            "SELECT s.delivered, s.acked, s.redelivered, t.last_seq FROM subscriptions s \
             JOIN topics t ON t.id = s.topic_id WHERE s.id = ?",
        )
        .bind(sub.id)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        let last_seq: i64 = row.try_get(3).map_err(db_err)?;
        let counts = sqlx::query(
            "SELECT coalesce(sum(state = 1 AND available_at > ?), 0), \
             coalesce(sum(state IN (0, 1)), 0), coalesce(sum(state = 2), 0), \
             min(CASE WHEN state IN (0, 1) THEN seq END), min(seq) \
             FROM deliveries WHERE sub_id = ?",
        )
        .bind(now)
        .bind(sub.id)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        let undone: i64 = counts.try_get(1).map_err(db_err)?;
        let first_undone: Option<i64> = counts.try_get(3).map_err(db_err)?;
        let first_any: Option<i64> = counts.try_get(4).map_err(db_err)?;
        let oldest_unacked_age = match oldest_unacked(sub.cursor, last_seq, first_undone) {
            Some(seq) => sqlx::query_scalar::<_, i64>(
                "SELECT published_at FROM messages WHERE topic_id = ? AND seq = ?",
            )
            .bind(sub.topic_id)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .map(|at| duration_from(now - at)),
            None => None,
        };
        let (blocked_keys, blocked_key_sample) = if sub.settings.ordered {
            let count: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT key) FROM deliveries WHERE sub_id = ? AND state = 0 \
                 AND attempt > 0 AND key IS NOT NULL",
            )
            .bind(sub.id)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
            let sample: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT key FROM deliveries WHERE sub_id = ? AND state = 0 \
                 AND attempt > 0 AND key IS NOT NULL ORDER BY key LIMIT 20",
            )
            .bind(sub.id)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
            (count, sample)
        } else {
            (0, Vec::new())
        };
        Ok(SubscriptionStats {
            backlog: (last_seq - sub.cursor).max(0) + undone,
            in_flight: counts.try_get(0).map_err(db_err)?,
            oldest_unacked_age,
            dead_lettered: counts.try_get(2).map_err(db_err)?,
            delivered: row.try_get(0).map_err(db_err)?,
            acked: row.try_get(1).map_err(db_err)?,
            redelivered: row.try_get(2).map_err(db_err)?,
            blocked_keys,
            blocked_key_sample,
            ack_watermark: ack_watermark(sub.cursor, first_any),
        })
    }

    pub(super) async fn list_dead_letters(
        &self,
        name: &str,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, i64)> {
        let sub = self.sub_row(name).await?;
        let sql = format!(
            "SELECT d.attempt, d.first_delivery_at, d.last_delivery_at, d.reason, d.available_at, \
             {MESSAGE_COLUMNS} FROM deliveries d \
             JOIN messages m ON m.topic_id = ? AND m.seq = d.seq \
             WHERE d.sub_id = ? AND d.state = 2 AND d.seq > ? ORDER BY d.seq LIMIT ?"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(sub.topic_id)
            .bind(sub.id)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(DeadLetter {
                attempts: r.try_get(0).map_err(db_err)?,
                first_delivery_at: r.try_get(1).map_err(db_err)?,
                last_delivery_at: r.try_get(2).map_err(db_err)?,
                reason: r
                    .try_get::<Option<String>, _>(3)
                    .map_err(db_err)?
                    .unwrap_or_default(),
                dead_lettered_at: r.try_get(4).map_err(db_err)?,
                message: message_from_row(r, 5, &sub.topic)?,
            });
        }
        let total: i64 =
            sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE sub_id = ? AND state = 2")
                .bind(sub.id)
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
        Ok((out, total))
    }
}
