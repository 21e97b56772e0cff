//! The PostgreSQL backend, for several broker instances on one database: the
//! writer task (group commit on one connection per instance), the read pool,
//! and the listener that turns other instances' NOTIFYs into local wake-ups.
//! All of PostgreSQL's SQL is in this file; the schema is in
//! `migrations/postgres/`.
//!
//! Unlike SQLite's writer, this one caches nothing that another instance can
//! change: it reads settings, counters and cursors in the transaction, and
//! relies on row locks where instances could race. Publishing locks the
//! topic's row (the per-topic counter), so sequence numbers of a topic commit
//! in order; leasing new messages locks the subscription's row; redeliveries,
//! expiries and acks lock the delivery rows they touch (`FOR UPDATE SKIP
//! LOCKED` where another instance may hold them).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
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
const MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("../../migrations/postgres/0001_broker.sql"))];

/// The NOTIFY channel instances wake each other on.
const CHANNEL: &str = "tidings";

/// Advisory lock keys: migrations, and one maintenance round at a time.
const MIGRATION_LOCK: i64 = 0x7469_6469_6e67_0001;
const MAINTENANCE_LOCK: i64 = 0x7469_6469_6e67_0002;

/// Columns of `messages` read into a [`StoredMessage`], in this order.
const MESSAGE_COLUMNS: &str =
    "m.seq, m.id, m.key, m.payload, m.attributes, m.created_at, m.published_at";

fn db_err(e: sqlx::Error) -> Error {
    e.into()
}

/// Reads the [`MESSAGE_COLUMNS`] starting at column `at`.
fn message_from_row(row: &PgRow, at: usize, topic: &str) -> Result<StoredMessage> {
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

/// Opens the database at `url`, migrates it, and returns the writer (to be
/// run as a task), the reader and the listener.
pub(super) async fn open(
    url: &str,
    config: &StoreConfig,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
) -> Result<(Writer, Reader, Listener)> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("bad database URL: {e}")))?;
    // Every statement here is a keyed lookup or a short range scan, and has
    // to stay one as tables grow: left to itself, the planner turns a
    // lookup of a few thousand ids into a hash join over the whole dedup
    // table once the batch is large enough, and publishing slows down as the
    // table grows. So this connection plans nested loops over indexes. Both
    // this and keeping list lookups unprepared are needed: with either one
    // alone, tidings bench on a fresh database fell to 12,000 msgs/s or
    // less (a generic plan made on the empty table took seconds a query).
    let options = options.statement_cache_capacity(1024).options([
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
        ("random_page_cost", "1.1"),
    ]);
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
    migrate(&mut conn).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .map_err(db_err)?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.clone())
        .await
        .map_err(db_err)?;
    let mut listener = PgListener::connect_with(&pool).await.map_err(db_err)?;
    listener.listen(CHANNEL).await.map_err(db_err)?;
    let writer = Writer {
        conn,
        options,
        pid,
        clock: Clock::new(),
        swept: HashMap::new(),
        deleted_below: HashMap::new(),
        dedup_window: micros(config.dedup_window),
        notifier: notifier.clone(),
        healthy,
    };
    let own = writer.pid;
    Ok((
        writer,
        Reader { pool },
        Listener {
            listener,
            notifier,
            own_pid: own,
        },
    ))
}

/// Applies pending migrations under an advisory lock, so that instances
/// starting together do not race.
pub(super) async fn migrate(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    let result = migrate_locked(conn).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    result
}

async fn migrate_locked(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS tidings_migrations \
         (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    let current: i64 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0)::BIGINT FROM tidings_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let mut tx = conn.begin().await.map_err(db_err)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db_err)?;
        sqlx::query("INSERT INTO tidings_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(version)
            .bind(now_micros())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    Ok(())
}

/// Turns other instances' notifications into local wake-ups.
pub(super) struct Listener {
    listener: PgListener,
    notifier: Notifier,
    own_pid: i32,
}

impl Listener {
    /// Runs until `alive` reports the store closed.
    pub(super) async fn run(mut self, alive: impl Fn() -> bool) {
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                received = self.listener.recv() => match received {
                    Ok(n) => {
                        if n.process_id() as i32 != self.own_pid {
                            self.notifier.notify_raw(n.payload());
                        }
                    }
                    Err(e) => {
                        if !alive() {
                            return;
                        }
                        // The listener reconnects on the next call; waiters
                        // fall back to polling meanwhile.
                        tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = check.tick() => {
                    if !alive() {
                        return;
                    }
                }
            }
        }
    }
}

/// Owns this instance's write connection; every write of the instance runs
/// here, in groups.
pub(super) struct Writer {
    conn: PgConnection,
    options: PgConnectOptions,
    pid: i32,
    clock: Clock,
    dedup_window: i64,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
    /// When this instance last swept each subscription for expired leases.
    swept: HashMap<i64, Micros>,
    /// Per topic, a sequence below which every message is deleted already,
    /// so deletion does not walk the index through rows it removed before
    /// (they stay as dead index entries until VACUUM).
    deleted_below: HashMap<i64, i64>,
}

/// How often one instance sweeps one subscription for expired leases. The
/// sweep walks the index through leases acked since the last VACUUM, so it
/// does not run on every lease.
const SWEEP_EVERY: i64 = 100_000;

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
                    tracing::warn!(error = %e, "closing the database connection failed");
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
        let mut failure = sqlx::query("BEGIN")
            .execute(&mut self.conn)
            .await
            .err()
            .map(|e| db_err(e).to_string());
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
        // Other instances learn of this group's changes when it commits:
        // PostgreSQL delivers notifications at COMMIT, once per distinct
        // payload, so one group sends at most one per topic and subscription.
        let keys: Vec<String> = touched
            .topics
            .iter()
            .map(|t| Notifier::key('t', t))
            .chain(touched.subs.iter().map(|s| Notifier::key('s', s)))
            .collect();
        if failure.is_none()
            && !keys.is_empty()
            && let Err(e) = sqlx::query("SELECT pg_notify($1, k) FROM unnest($2::TEXT[]) AS k")
                .bind(CHANNEL)
                .bind(keys)
                .execute(&mut self.conn)
                .await
        {
            failure = Some(db_err(e).to_string());
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
                tracing::warn!(error = %reason, "group commit failed; every request in it was refused");
                if sqlx::query("ROLLBACK")
                    .execute(&mut self.conn)
                    .await
                    .is_err()
                {
                    self.reconnect().await;
                }
                for done in dones {
                    done(Some(&reason));
                }
            }
        }
    }

    /// Replaces a broken connection; health stays NOT_SERVING until a
    /// commit succeeds again.
    async fn reconnect(&mut self) {
        self.healthy
            .send_if_modified(|h| std::mem::replace(h, false));
        match PgConnection::connect_with(&self.options).await {
            Ok(mut conn) => {
                if let Ok(pid) = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                    .fetch_one(&mut conn)
                    .await
                {
                    self.pid = pid;
                }
                self.conn = conn;
                tracing::info!("reconnected to PostgreSQL");
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL is unreachable"),
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
            Op::Close(r) => finish(r, Ok(())),
        }
    }

    async fn topic(&mut self, name: &str) -> Result<TopicRow> {
        let sql = format!("SELECT {} FROM topics WHERE name = $1", TopicRow::COLUMNS);
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("topic {name:?} does not exist")))?;
        TopicRow::from_row(&row)
    }

    async fn sub(&mut self, name: &str) -> Result<SubRow> {
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = $1",
            SubRow::COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::NotFound(format!("subscription {name:?} does not exist")))?;
        SubRow::from_row(&row)
    }

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

    // ---- publishing ----

    async fn publish(
        &mut self,
        messages: Vec<NewMessage>,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<PublishOutcome>> {
        let mut groups: Vec<(String, i64, Vec<usize>)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match groups.iter_mut().find(|(topic, _, _)| *topic == m.topic) {
                Some((_, _, indexes)) => indexes.push(i),
                None => {
                    let id = self.topic(&m.topic).await?.id;
                    groups.push((m.topic.clone(), id, vec![i]));
                }
            }
        }
        // Topic rows are locked in id order, so that two instances
        // publishing to the same topics cannot deadlock.
        groups.sort_by_key(|(_, id, _)| *id);
        let mut outcomes = vec![None; messages.len()];
        for (topic, id, indexes) in groups {
            let batch: Vec<&NewMessage> = indexes.iter().map(|&i| &messages[i]).collect();
            let results = self.publish_to(id, &batch, now).await?;
            for (i, outcome) in indexes.into_iter().zip(results) {
                outcomes[i] = Some(outcome);
            }
            t.topics.insert(topic);
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    async fn publish_group(
        &mut self,
        ops: Vec<Op>,
        now: Micros,
        t: &mut Touched,
    ) -> Vec<(Done, Option<String>)> {
        let mut out = Vec::with_capacity(ops.len());
        let mut accepted = Vec::with_capacity(ops.len());
        let mut all = Vec::new();
        let mut known: HashSet<String> = HashSet::new();
        for op in ops {
            let Op::Publish(messages, reply) = op else {
                continue;
            };
            let mut missing = None;
            for m in &messages {
                if known.contains(&m.topic) {
                    continue;
                }
                match self.topic(&m.topic).await {
                    Ok(_) => {
                        known.insert(m.topic.clone());
                    }
                    Err(e) => {
                        missing = Some(e);
                        break;
                    }
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

    /// Stores the messages of one topic that it has not seen yet. Takes the
    /// topic's row lock first: a concurrent publisher to the topic waits
    /// for this commit, then sees these ids and sequence numbers.
    async fn publish_to(
        &mut self,
        topic_id: i64,
        messages: &[&NewMessage],
        now: Micros,
    ) -> Result<Vec<PublishOutcome>> {
        let last_seq: i64 =
            sqlx::query_scalar("SELECT last_seq FROM topics WHERE id = $1 FOR UPDATE")
                .bind(topic_id)
                .fetch_one(&mut self.conn)
                .await
                .map_err(db_err)?;
        let mut known: HashMap<Uuid, i64> = HashMap::new();
        for chunk in messages.chunks(CHUNK) {
            let ids: Vec<Vec<u8>> = chunk.iter().map(|m| m.id.as_bytes().to_vec()).collect();
            // Statements that look up a list are not kept prepared
            // (`persistent(false)`): the generic plan PostgreSQL settles on
            // for a prepared statement is made from the table's size at the
            // time, and one made while the table was small scans the whole
            // topic once it is large. Unprepared, each is planned for the
            // list and the table as they are.
            let rows = sqlx::query(
                "SELECT d.id, d.seq FROM unnest($2::BYTEA[]) AS u(id) \
                 JOIN dedup d ON d.topic_id = $1 AND d.id = u.id",
            )
            .persistent(false)
            .bind(topic_id)
            .bind(ids)
            .fetch_all(&mut self.conn)
            .await
            .map_err(db_err)?;
            for r in rows {
                let id: Vec<u8> = r.try_get(0).map_err(db_err)?;
                known.insert(uuid_from(&id)?, r.try_get(1).map_err(db_err)?);
            }
        }
        let mut seq = last_seq;
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
            let seqs: Vec<i64> = chunk.iter().map(|(_, s)| *s).collect();
            let ids: Vec<Vec<u8>> = chunk
                .iter()
                .map(|(m, _)| m.id.as_bytes().to_vec())
                .collect();
            let keys: Vec<Option<String>> = chunk.iter().map(|(m, _)| m.key.clone()).collect();
            let payloads: Vec<Vec<u8>> = chunk.iter().map(|(m, _)| m.payload.clone()).collect();
            let attributes: Vec<Option<Vec<u8>>> = chunk
                .iter()
                .map(|(m, _)| encode_attributes(&m.attributes))
                .collect();
            let created: Vec<Option<i64>> = chunk.iter().map(|(m, _)| m.created_at).collect();
            sqlx::query(
                "INSERT INTO messages (topic_id, seq, id, key, payload, attributes, created_at, \
                 published_at) SELECT $1, s, i, k, p, a, c, $8 FROM UNNEST($2::BIGINT[], \
                 $3::BYTEA[], $4::TEXT[], $5::BYTEA[], $6::BYTEA[], $7::BIGINT[]) AS u(s, i, k, p, a, c)",
            )
            .bind(topic_id)
            .bind(&seqs)
            .bind(&ids)
            .bind(keys)
            .bind(payloads)
            .bind(attributes)
            .bind(created)
            .bind(now)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            sqlx::query(
                "INSERT INTO dedup (topic_id, id, seq, published_at) \
                 SELECT $1, i, s, $4 FROM UNNEST($2::BYTEA[], $3::BIGINT[]) AS u(i, s)",
            )
            .bind(topic_id)
            .bind(ids)
            .bind(seqs)
            .bind(now)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        }
        sqlx::query("UPDATE topics SET last_seq = $1 WHERE id = $2")
            .bind(seq)
            .bind(topic_id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        Ok(outcomes)
    }

    // ---- topics and subscriptions ----

    async fn create_topic(
        &mut self,
        name: String,
        settings: TopicSettings,
        now: Micros,
    ) -> Result<Topic> {
        let sql = format!(
            "INSERT INTO topics (name, created_at, retention_us, max_age_us) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING RETURNING {}",
            TopicRow::COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(&name)
            .bind(now)
            .bind(micros(settings.retention))
            .bind(micros(settings.max_age))
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::AlreadyExists(format!("topic {name:?} already exists")))?;
        Ok(TopicRow::from_row(&row)?.to_topic())
    }

    async fn update_topic(&mut self, name: &str, patch: TopicPatch) -> Result<Topic> {
        let row = self.topic(name).await?;
        sqlx::query("UPDATE topics SET retention_us = $1, max_age_us = $2 WHERE id = $3")
            .bind(patch.retention.map(micros).unwrap_or(row.retention_us))
            .bind(patch.max_age.map(micros).unwrap_or(row.max_age_us))
            .bind(row.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        Ok(self.topic(name).await?.to_topic())
    }

    async fn delete_topic(&mut self, name: &str) -> Result<()> {
        let row = self.topic(name).await?;
        // Lock the topic so that no subscription is created meanwhile.
        sqlx::query("SELECT 1 FROM topics WHERE id = $1 FOR UPDATE")
            .bind(row.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        let subs: Vec<String> =
            sqlx::query_scalar("SELECT name FROM subscriptions WHERE topic_id = $1 ORDER BY name")
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
                "DELETE FROM messages WHERE topic_id = $1",
                "DELETE FROM dedup WHERE topic_id = $1",
                "DELETE FROM topics WHERE id = $1",
            ],
            row.id,
        )
        .await?;
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
            "SELECT min(seq) FROM messages WHERE topic_id = $1 AND published_at >= $2",
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
        let topic = self.topic(&sub.topic).await?;
        self.check_dead_letter_topic(&sub.topic, sub.settings.dead_letter_topic.as_deref())
            .await?;
        let cursor = match sub.start {
            StartPosition::Earliest => 0,
            StartPosition::Latest => topic.last_seq,
            StartPosition::Time(time) => self.first_seq_at(&topic, time).await? - 1,
        };
        let s = &sub.settings;
        let inserted = sqlx::query(
            "INSERT INTO subscriptions (name, topic_id, created_at, ack_deadline_us, max_attempts, \
             min_backoff_us, max_backoff_us, dead_letter_topic, ordered, cursor) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (name) DO NOTHING",
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
        if inserted.rows_affected() == 0 {
            return Err(Error::AlreadyExists(format!(
                "subscription {:?} already exists",
                sub.name
            )));
        }
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
            "UPDATE subscriptions SET ack_deadline_us = $1, max_attempts = $2, min_backoff_us = $3, \
             max_backoff_us = $4, dead_letter_topic = $5, ordered = $6 WHERE id = $7",
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
        t.subs.insert(name.to_owned());
        Ok(self.sub(name).await?.to_subscription())
    }

    async fn delete_subscription(&mut self, name: &str, t: &mut Touched) -> Result<()> {
        let row = self.sub(name).await?;
        self.run_with_id(
            &[
                "DELETE FROM deliveries WHERE sub_id = $1",
                "DELETE FROM subscriptions WHERE id = $1",
            ],
            row.id,
        )
        .await?;
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
        let last_sweep = self.swept.get(&sub.id).copied().unwrap_or(i64::MIN);
        if now.saturating_sub(last_sweep) >= SWEEP_EVERY {
            self.swept.insert(sub.id, now);
            if self.expire(&sub, now).await? > 0 {
                t.subs.insert(sub.name.clone());
            }
        }
        let deadline = now.saturating_add(micros(sub.settings.ack_deadline));
        let mut batch = LeaseBatch::default();
        let mut bytes = 0usize;
        let mut redelivered = 0i64;

        // Redeliveries that are due come first; rows another instance is
        // leasing right now are skipped. On an ordered subscription only the
        // oldest waiting message of each key qualifies.
        let due_sql = if ordered {
            format!(
                "SELECT d.attempt, {MESSAGE_COLUMNS} FROM deliveries d \
                 JOIN messages m ON m.topic_id = $3 AND m.seq = d.seq \
                 WHERE d.sub_id = $1 AND d.state = 0 AND d.available_at <= $2 \
                 AND (d.key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e \
                   WHERE e.sub_id = d.sub_id AND e.key = d.key AND e.seq < d.seq \
                   AND e.state IN (0, 1))) \
                 ORDER BY d.seq LIMIT $4 FOR UPDATE OF d SKIP LOCKED"
            )
        } else {
            format!(
                "SELECT d.attempt, {MESSAGE_COLUMNS} FROM deliveries d \
                 JOIN messages m ON m.topic_id = $3 AND m.seq = d.seq \
                 WHERE d.sub_id = $1 AND d.state = 0 AND d.available_at <= $2 \
                 ORDER BY d.available_at LIMIT $4 FOR UPDATE OF d SKIP LOCKED"
            )
        };
        let rows = sqlx::query(AssertSqlSafe(due_sql))
            .bind(sub.id)
            .bind(now)
            .bind(sub.topic_id)
            .bind(req.max_messages as i64)
            .fetch_all(&mut self.conn)
            .await
            .map_err(db_err)?;
        for row in rows {
            let message = message_from_row(&row, 1, &sub.topic)?;
            if !batch.deliveries.is_empty() && bytes + message.payload.len() > req.max_bytes {
                break;
            }
            let attempt: i32 = row.try_get::<i32, _>(0).map_err(db_err)? + 1;
            let token = self.clock.token();
            sqlx::query(
                "UPDATE deliveries SET state = 1, attempt = $1, available_at = $2, lease = $3, \
                 first_delivery_at = coalesce(first_delivery_at, $4), last_delivery_at = $4, \
                 reason = NULL WHERE sub_id = $5 AND seq = $6",
            )
            .bind(attempt)
            .bind(deadline)
            .bind(token)
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

        // Then new messages past the cursor. The subscription's row lock
        // makes instances take turns; without news, no lock is taken.
        let room = req.max_messages.saturating_sub(batch.deliveries.len());
        let last_seq: i64 = sqlx::query_scalar("SELECT last_seq FROM topics WHERE id = $1")
            .bind(sub.topic_id)
            .fetch_one(&mut self.conn)
            .await
            .map_err(db_err)?;
        let mut cursor = sub.cursor;
        let mut locked_cursor = sub.cursor;
        if room > 0 && bytes < req.max_bytes && last_seq > sub.cursor {
            locked_cursor =
                sqlx::query_scalar("SELECT cursor FROM subscriptions WHERE id = $1 FOR UPDATE")
                    .bind(sub.id)
                    .fetch_one(&mut self.conn)
                    .await
                    .map_err(db_err)?;
            cursor = locked_cursor;
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = $1 AND m.seq > $2 \
                 ORDER BY m.seq LIMIT $3"
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(sub.topic_id)
                .bind(locked_cursor)
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
            let mut seqs = Vec::new();
            let mut states = Vec::new();
            let mut attempts: Vec<i32> = Vec::new();
            let mut availables = Vec::new();
            let mut leases = Vec::new();
            let mut delivered_at: Vec<Option<i64>> = Vec::new();
            let mut keys: Vec<Option<String>> = Vec::new();
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
                seqs.push(message.sequence);
                keys.push(key.clone());
                if held {
                    states.push(WAITING);
                    attempts.push(0);
                    availables.push(0);
                    leases.push(0);
                    delivered_at.push(None);
                    continue;
                }
                if let Some(k) = key {
                    blocked.insert(k);
                }
                let token = self.clock.token();
                states.push(LEASED);
                attempts.push(1);
                availables.push(deadline);
                leases.push(token);
                delivered_at.push(Some(now));
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
            if !seqs.is_empty() {
                sqlx::query(
                    "INSERT INTO deliveries (sub_id, seq, state, attempt, available_at, lease, \
                     first_delivery_at, last_delivery_at, key) \
                     SELECT $1, s, st, a, av, l, d, d, k FROM UNNEST($2::BIGINT[], $3::BIGINT[], \
                     $4::INTEGER[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::TEXT[]) \
                     AS u(s, st, a, av, l, d, k)",
                )
                .bind(sub.id)
                .bind(seqs)
                .bind(states)
                .bind(attempts)
                .bind(availables)
                .bind(leases)
                .bind(delivered_at)
                .bind(keys)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
            }
        }
        let delivered = batch.deliveries.len() as i64;
        // The cursor is written only when it was read under the row lock:
        // the unlocked copy may be older than another instance's commit, and
        // writing it back would replay messages that were acked since.
        if cursor != locked_cursor || delivered > 0 {
            sqlx::query(
                "UPDATE subscriptions SET cursor = CASE WHEN $5 THEN $1 ELSE cursor END, \
                 delivered = delivered + $2, redelivered = redelivered + $3 WHERE id = $4",
            )
            .bind(cursor)
            .bind(delivered)
            .bind(redelivered)
            .bind(sub.id)
            .bind(cursor != locked_cursor)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            batch.progressed = cursor != locked_cursor;
        }
        // No next_due: finding the earliest future deadline would walk the
        // index through every lease acked since the last VACUUM. Waiting
        // streams are woken by NOTIFY, and otherwise by the poll interval.
        Ok(batch)
    }

    async fn keys_in_progress(
        &mut self,
        sub: &SubRow,
        messages: &[StoredMessage],
    ) -> Result<HashSet<String>> {
        let keys: Vec<String> = messages
            .iter()
            .filter_map(|m| m.key.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        let blocked: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT d.key FROM unnest($2::TEXT[]) AS u(key) \
             JOIN deliveries d ON d.sub_id = $1 AND d.key = u.key AND d.state IN (0, 1)",
        )
        .persistent(false)
        .bind(sub.id)
        .bind(keys)
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err)?;
        Ok(blocked.into_iter().collect())
    }

    async fn expire(&mut self, sub: &SubRow, now: Micros) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT seq, attempt, available_at FROM deliveries \
             WHERE sub_id = $1 AND state = 1 AND available_at <= $2 LIMIT $3 FOR UPDATE SKIP LOCKED",
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
                    "UPDATE deliveries SET state = 0, available_at = $1, \
                     reason = 'lease expired' WHERE sub_id = $2 AND seq = $3",
                )
                .bind(at)
                .bind(sub.id)
                .bind(seq)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
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
            "UPDATE deliveries SET state = 2, available_at = $1, reason = $2 \
             WHERE sub_id = $3 AND seq = $4",
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
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = $1 AND m.seq = $2"
        );
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
        let copy = NewMessage {
            id: original.id,
            topic: dlt.clone(),
            key: original.key,
            payload: original.payload,
            attributes: dead_letter_attributes(
                original.attributes,
                reason,
                seq,
                &sub.name,
                &sub.topic,
            ),
            created_at: original.created_at,
        };
        match self.topic(&dlt).await {
            Ok(topic) => {
                self.publish_to(topic.id, &[&copy], now).await?;
                self.notifier.notify_topic(&dlt);
            }
            Err(Error::NotFound(_)) => tracing::warn!(
                subscription = %sub.name,
                dead_letter_topic = %dlt,
                "dead-letter topic is gone; the dead letter is kept on the subscription only"
            ),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Checks leases against the stored deliveries, locking their rows.
    async fn check(&mut self, sub: &SubRow, ids: &[AckId], now: Micros) -> Result<Vec<Check>> {
        let mut rows: HashMap<i64, (i64, i64, i64, i32)> = HashMap::new();
        let ours: Vec<i64> = ids
            .iter()
            .filter(|id| id.subscription == sub.id)
            .map(|id| id.sequence)
            .collect();
        for chunk in ours.chunks(CHUNK) {
            let found = sqlx::query(
                "SELECT d.seq, d.state, d.lease, d.available_at, d.attempt \
                 FROM unnest($2::BIGINT[]) AS u(seq) \
                 JOIN deliveries d ON d.sub_id = $1 AND d.seq = u.seq FOR UPDATE OF d",
            )
            .persistent(false)
            .bind(sub.id)
            .bind(chunk)
            .fetch_all(&mut self.conn)
            .await
            .map_err(db_err)?;
            for r in found {
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
        if !current.is_empty() {
            sqlx::query(
                "DELETE FROM deliveries d USING unnest($2::BIGINT[]) AS u(seq) \
                 WHERE d.sub_id = $1 AND d.seq = u.seq",
            )
            .persistent(false)
            .bind(sub.id)
            .bind(&current)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            sqlx::query("UPDATE subscriptions SET acked = acked + $1 WHERE id = $2")
                .bind(current.len() as i64)
                .bind(sub.id)
                .execute(&mut self.conn)
                .await
                .map_err(db_err)?;
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
                sqlx::query(
                    "UPDATE deliveries SET state = 0, available_at = $1, reason = $2 \
                     WHERE sub_id = $3 AND seq = $4",
                )
                .bind(now.saturating_add(micros(delay)))
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
            sqlx::query("UPDATE deliveries SET available_at = $1 WHERE sub_id = $2 AND seq = $3")
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
        let current = current_seqs(&checks);
        if !current.is_empty() {
            sqlx::query(
                "UPDATE deliveries d SET state = 0, available_at = $1 \
                 FROM unnest($3::BIGINT[]) AS u(seq) WHERE d.sub_id = $2 AND d.seq = u.seq",
            )
            .persistent(false)
            .bind(now)
            .bind(sub.id)
            .bind(current)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
            t.subs.insert(sub.name.clone());
        }
        Ok(checks.into_iter().map(status_of).collect())
    }

    // ---- cursor and dead letters ----

    async fn seek(&mut self, sub: &str, target: SeekTarget, t: &mut Touched) -> Result<i64> {
        let row = self.sub(sub).await?;
        sqlx::query("SELECT 1 FROM subscriptions WHERE id = $1 FOR UPDATE")
            .bind(row.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        let topic = self.topic(&row.topic).await?;
        let next = match target {
            SeekTarget::Sequence(seq) => seq.clamp(1, topic.last_seq + 1),
            SeekTarget::Time(time) => self.first_seq_at(&topic, time).await?,
        };
        sqlx::query("DELETE FROM deliveries WHERE sub_id = $1 AND (state IN (0, 1) OR seq >= $2)")
            .bind(row.id)
            .bind(next)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        sqlx::query("UPDATE subscriptions SET cursor = $1 WHERE id = $2")
            .bind(next - 1)
            .bind(row.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
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
        let done = sqlx::query(
            "UPDATE deliveries SET state = 0, attempt = 0, available_at = $1, reason = NULL \
             WHERE sub_id = $2 AND state = 2 AND (cardinality($3::BIGINT[]) = 0 OR seq = ANY($3))",
        )
        .bind(now)
        .bind(row.id)
        .bind(&seqs)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        let count = done.rows_affected() as i64;
        t.subs.insert(sub.to_owned());
        tracing::info!(subscription = sub, count, "dead letters redriven");
        Ok(count)
    }

    async fn purge(&mut self, sub: &str, seqs: Option<Vec<i64>>) -> Result<i64> {
        let row = self.sub(sub).await?;
        let seqs = seqs.unwrap_or_default();
        let done = sqlx::query(
            "DELETE FROM deliveries WHERE sub_id = $1 AND state = 2 \
             AND (cardinality($2::BIGINT[]) = 0 OR seq = ANY($2))",
        )
        .bind(row.id)
        .bind(&seqs)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        let count = done.rows_affected() as i64;
        tracing::warn!(subscription = sub, count, "dead letters purged");
        Ok(count)
    }

    // ---- maintenance ----

    async fn maintain(&mut self, now: Micros, t: &mut Touched) -> Result<MaintenanceReport> {
        let mut report = MaintenanceReport::default();
        // One instance at a time does the sweeping; the others skip it.
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(MAINTENANCE_LOCK)
            .fetch_one(&mut self.conn)
            .await
            .map_err(db_err)?;
        if !ours {
            return Ok(report);
        }
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM subscriptions")
            .fetch_all(&mut self.conn)
            .await
            .map_err(db_err)?;
        for name in names {
            let sub = match self.sub(&name).await {
                Ok(sub) => sub,
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
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
                "SELECT min(least(coalesce((SELECT min(seq) FROM deliveries d \
                 WHERE d.sub_id = s.id), s.cursor + 1), s.cursor + 1)) \
                 FROM subscriptions s WHERE s.topic_id = $1",
            )
            .bind(topic.id)
            .fetch_one(&mut self.conn)
            .await
            .map_err(db_err)?;
            let low = low.unwrap_or(topic.last_seq + 1);
            if topic.max_age_us > 0 {
                report.expired += self
                    .expire_old(&topic, low, now - topic.max_age_us, t)
                    .await?;
            }
            // Delete by sequence range from where the last round stopped.
            let from = self.deleted_below.get(&topic.id).copied().unwrap_or(0);
            let to = low.min(from.saturating_add(DELETE_LIMIT as i64));
            if to > from {
                let deleted: Vec<i64> = sqlx::query_scalar(
                    "DELETE FROM messages WHERE topic_id = $1 AND seq >= $2 AND seq < $3 \
                     AND published_at <= $4 RETURNING seq",
                )
                .bind(topic.id)
                .bind(from)
                .bind(to)
                .bind(now - topic.retention_us)
                .fetch_all(&mut self.conn)
                .await
                .map_err(db_err)?;
                report.deleted += deleted.len() as u64;
                // Messages are published in time order: what stayed in the
                // range is younger than the retention, and so is what follows.
                let whole_range = deleted.len() as i64 == to - from
                    || sqlx::query_scalar::<_, bool>(
                        "SELECT NOT EXISTS (SELECT 1 FROM messages WHERE topic_id = $1 \
                         AND seq >= $2 AND seq < $3)",
                    )
                    .bind(topic.id)
                    .bind(from)
                    .bind(to)
                    .fetch_one(&mut self.conn)
                    .await
                    .map_err(db_err)?;
                if whole_range {
                    self.deleted_below.insert(topic.id, to);
                    report.more |= to < low;
                }
            }
        }
        let pruned = sqlx::query(
            "DELETE FROM dedup WHERE (topic_id, id) IN \
             (SELECT topic_id, id FROM dedup WHERE published_at < $1 LIMIT $2)",
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

    async fn expire_old(
        &mut self,
        topic: &TopicRow,
        low: i64,
        cutoff: Micros,
        t: &mut Touched,
    ) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT seq, published_at FROM messages WHERE topic_id = $1 ORDER BY seq LIMIT 10000",
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
        sqlx::query("DELETE FROM messages WHERE topic_id = $1 AND seq <= $2")
            .bind(topic.id)
            .bind(last)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        sqlx::query(
            "DELETE FROM deliveries WHERE seq <= $2 AND sub_id IN \
             (SELECT id FROM subscriptions WHERE topic_id = $1)",
        )
        .bind(topic.id)
        .bind(last)
        .execute(&mut self.conn)
        .await
        .map_err(db_err)?;
        let affected: Vec<String> = sqlx::query_scalar(
            "UPDATE subscriptions SET cursor = greatest(cursor, $1) WHERE topic_id = $2 RETURNING name",
        )
        .bind(last)
        .bind(topic.id)
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err)?;
        sqlx::query("UPDATE topics SET expired_count = expired_count + $1 WHERE id = $2")
            .bind(unacked as i64)
            .bind(topic.id)
            .execute(&mut self.conn)
            .await
            .map_err(db_err)?;
        t.subs.extend(affected);
        tracing::warn!(
            topic = %topic.name,
            count = unacked,
            up_to_sequence = last,
            "unacked messages expired by the topic's max age"
        );
        Ok(unacked)
    }
}

/// The read side: a pool for admin queries.
#[derive(Debug, Clone)]
pub(super) struct Reader {
    pool: PgPool,
}

impl Reader {
    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    async fn sub_row(&self, name: &str) -> Result<SubRow> {
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = $1",
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
        let sql = format!("SELECT {} FROM topics WHERE name = $1", TopicRow::COLUMNS);
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
            "SELECT {} FROM topics WHERE name > $1 ORDER BY name LIMIT $2",
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
             WHERE s.name > $1 AND ($2::TEXT IS NULL OR t.name = $2) ORDER BY s.name LIMIT $3",
            SubRow::COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after.unwrap_or(""))
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
             JOIN topics t ON t.id = s.topic_id WHERE s.id = $1",
        )
        .bind(sub.id)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        let last_seq: i64 = row.try_get(3).map_err(db_err)?;
        let counts = sqlx::query(
            "SELECT count(*) FILTER (WHERE state = 1 AND available_at > $1), \
             count(*) FILTER (WHERE state IN (0, 1)), count(*) FILTER (WHERE state = 2), \
             min(seq) FILTER (WHERE state IN (0, 1)), min(seq) \
             FROM deliveries WHERE sub_id = $2",
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
                "SELECT published_at FROM messages WHERE topic_id = $1 AND seq = $2",
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
                "SELECT count(DISTINCT key) FROM deliveries WHERE sub_id = $1 AND state = 0 \
                 AND attempt > 0 AND key IS NOT NULL",
            )
            .bind(sub.id)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
            let sample: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT key FROM deliveries WHERE sub_id = $1 AND state = 0 \
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
             JOIN messages m ON m.topic_id = $1 AND m.seq = d.seq \
             WHERE d.sub_id = $2 AND d.state = 2 AND d.seq > $3 ORDER BY d.seq LIMIT $4"
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
            sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE sub_id = $1 AND state = 2")
                .bind(sub.id)
                .fetch_one(&self.pool)
                .await
                .map_err(db_err)?;
        Ok((out, total))
    }
}
