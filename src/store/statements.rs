//! The statements whose binding is the same on every backend. Each is
//! written here once: its signature, what it binds (in this order) and how
//! its rows are read. Each backend supplies only the SQL text, as constants
//! of the same names in a `sql` module of its own file, beside its
//! migrations, and expands [`shared_statements!`] inside its
//! `impl Backend`. Statements that bind differently (PostgreSQL passes
//! lists as arrays, SQLite as placeholder lists) are written by each backend.

/// The columns of `topics` that [`super::common::TopicRow::from_row`]
/// reads, in order.
macro_rules! topic_columns {
    () => {
        "id, name, created_at, retention_us, max_age_us, last_seq, expired_count"
    };
}

/// The columns of `subscriptions s JOIN topics t` that
/// [`super::common::SubRow::from_row`] reads, in order.
macro_rules! sub_columns {
    () => {
        "s.id, s.name, s.topic_id, t.name, s.created_at, s.ack_deadline_us, s.max_attempts, \
         s.min_backoff_us, s.max_backoff_us, s.dead_letter_topic, s.ordered, s.cursor"
    };
}

/// The columns of `messages m` that
/// [`super::common::message_from_row`] reads, in order.
macro_rules! message_columns {
    () => {
        "m.seq, m.id, m.key, m.payload, m.attributes, m.created_at, m.published_at"
    };
}

/// The columns of `deliveries d JOIN messages m` that
/// [`super::common::dead_letter_from_row`] reads, in order.
macro_rules! dead_letter_columns {
    () => {
        concat!(
            "d.attempt, d.first_delivery_at, d.last_delivery_at, d.reason, d.available_at, ",
            message_columns!()
        )
    };
}

/// Expands, inside a backend's `impl Backend`, to the statements written
/// once; the SQL comes from the backend's `sql` module, the connection type
/// from its `Conn` alias.
macro_rules! shared_statements {
    () => {
        async fn topic(c: &mut Conn, name: &str) -> Result<Option<TopicRow>> {
            let row = sqlx::query(sql::TOPIC).bind(name).fetch_optional(c).await?;
            row.as_ref().map(TopicRow::from_row).transpose()
        }

        async fn list_topics(c: &mut Conn, after: &str, limit: i64) -> Result<Vec<TopicRow>> {
            let rows = sqlx::query(sql::LIST_TOPICS)
                .bind(after)
                .bind(limit)
                .fetch_all(c)
                .await?;
            rows.iter().map(TopicRow::from_row).collect()
        }

        async fn insert_topic(
            c: &mut Conn,
            name: &str,
            retention_us: i64,
            max_age_us: i64,
            now: Micros,
        ) -> Result<Option<TopicRow>> {
            let row = sqlx::query(sql::INSERT_TOPIC)
                .bind(name)
                .bind(now)
                .bind(retention_us)
                .bind(max_age_us)
                .fetch_optional(c)
                .await?;
            row.as_ref().map(TopicRow::from_row).transpose()
        }

        async fn lock_topic(c: &mut Conn, topic_id: i64) -> Result<i64> {
            let q = sqlx::query_scalar(sql::LOCK_TOPIC).bind(topic_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn last_seq(c: &mut Conn, topic_id: i64) -> Result<i64> {
            let q = sqlx::query_scalar(sql::LAST_SEQ).bind(topic_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn set_last_seq(c: &mut Conn, topic_id: i64, seq: i64) -> Result<()> {
            let q = sqlx::query(sql::SET_LAST_SEQ).bind(seq).bind(topic_id);
            q.execute(c).await?;
            Ok(())
        }

        async fn set_topic_settings(
            c: &mut Conn,
            topic_id: i64,
            retention_us: i64,
            max_age_us: i64,
        ) -> Result<()> {
            sqlx::query(sql::SET_TOPIC_SETTINGS)
                .bind(retention_us)
                .bind(max_age_us)
                .bind(topic_id)
                .execute(c)
                .await?;
            Ok(())
        }

        async fn delete_topic(c: &mut Conn, topic_id: i64) -> Result<()> {
            for statement in sql::DELETE_TOPIC {
                sqlx::query(statement)
                    .bind(topic_id)
                    .execute(&mut *c)
                    .await?;
            }
            Ok(())
        }

        async fn messages_after(
            c: &mut Conn,
            topic_id: i64,
            topic: &str,
            after: i64,
            limit: i64,
        ) -> Result<Vec<StoredMessage>> {
            let rows = sqlx::query(sql::MESSAGES_AFTER)
                .bind(topic_id)
                .bind(after)
                .bind(limit)
                .fetch_all(c)
                .await?;
            rows.iter().map(|r| message_from_row(r, 0, topic)).collect()
        }

        async fn message_at(
            c: &mut Conn,
            topic_id: i64,
            topic: &str,
            seq: i64,
        ) -> Result<Option<StoredMessage>> {
            let q = sqlx::query(sql::MESSAGE_AT).bind(topic_id).bind(seq);
            let row = q.fetch_optional(c).await?;
            row.map(|r| message_from_row(&r, 0, topic)).transpose()
        }

        async fn first_seq_at(c: &mut Conn, topic_id: i64, time: Micros) -> Result<Option<i64>> {
            let q = sqlx::query_scalar(sql::FIRST_SEQ_AT)
                .bind(topic_id)
                .bind(time);
            Ok(q.fetch_one(c).await?)
        }

        async fn first_seq(c: &mut Conn, topic_id: i64) -> Result<Option<i64>> {
            let q = sqlx::query_scalar(sql::FIRST_SEQ).bind(topic_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn published_at(c: &mut Conn, topic_id: i64, seq: i64) -> Result<Option<Micros>> {
            let q = sqlx::query_scalar(sql::PUBLISHED_AT)
                .bind(topic_id)
                .bind(seq);
            Ok(q.fetch_optional(c).await?)
        }

        async fn sub(c: &mut Conn, name: &str) -> Result<Option<SubRow>> {
            let row = sqlx::query(sql::SUB).bind(name).fetch_optional(c).await?;
            row.as_ref().map(SubRow::from_row).transpose()
        }

        async fn list_subs(
            c: &mut Conn,
            topic: Option<&str>,
            after: &str,
            limit: i64,
        ) -> Result<Vec<SubRow>> {
            let rows = sqlx::query(sql::LIST_SUBS)
                .bind(after)
                .bind(topic)
                .bind(limit)
                .fetch_all(c)
                .await?;
            rows.iter().map(SubRow::from_row).collect()
        }

        async fn sub_names(c: &mut Conn, topic_id: Option<i64>) -> Result<Vec<String>> {
            let q = sqlx::query_scalar(sql::SUB_NAMES).bind(topic_id);
            Ok(q.fetch_all(c).await?)
        }

        async fn dead_letter_users(c: &mut Conn, topic: &str, limit: i64) -> Result<Vec<String>> {
            let q = sqlx::query_scalar(sql::DEAD_LETTER_USERS)
                .bind(topic)
                .bind(limit);
            Ok(q.fetch_all(c).await?)
        }

        async fn insert_sub(
            c: &mut Conn,
            name: &str,
            topic_id: i64,
            s: &SubscriptionSettings,
            cursor: i64,
            now: Micros,
        ) -> Result<bool> {
            let done = sqlx::query(sql::INSERT_SUB)
                .bind(name)
                .bind(topic_id)
                .bind(now)
                .bind(micros(s.ack_deadline))
                .bind(s.max_attempts)
                .bind(micros(s.min_backoff))
                .bind(micros(s.max_backoff))
                .bind(s.dead_letter_topic.clone())
                .bind(s.ordered)
                .bind(cursor)
                .execute(c)
                .await?;
            Ok(done.rows_affected() > 0)
        }

        async fn lock_cursor(c: &mut Conn, sub_id: i64) -> Result<i64> {
            let q = sqlx::query_scalar(sql::LOCK_CURSOR).bind(sub_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn set_sub_settings(
            c: &mut Conn,
            sub_id: i64,
            s: &SubscriptionSettings,
        ) -> Result<()> {
            sqlx::query(sql::SET_SUB_SETTINGS)
                .bind(micros(s.ack_deadline))
                .bind(s.max_attempts)
                .bind(micros(s.min_backoff))
                .bind(micros(s.max_backoff))
                .bind(s.dead_letter_topic.clone())
                .bind(s.ordered)
                .bind(sub_id)
                .execute(c)
                .await?;
            Ok(())
        }

        async fn delete_sub(c: &mut Conn, sub_id: i64) -> Result<()> {
            for statement in sql::DELETE_SUB {
                sqlx::query(statement).bind(sub_id).execute(&mut *c).await?;
            }
            Ok(())
        }

        async fn advance(
            c: &mut Conn,
            sub_id: i64,
            cursor: Option<i64>,
            delivered: i64,
            redelivered: i64,
        ) -> Result<()> {
            sqlx::query(sql::ADVANCE)
                .bind(cursor)
                .bind(delivered)
                .bind(redelivered)
                .bind(sub_id)
                .execute(c)
                .await?;
            Ok(())
        }

        async fn add_acked(c: &mut Conn, sub_id: i64, count: i64) -> Result<()> {
            let q = sqlx::query(sql::ADD_ACKED).bind(count).bind(sub_id);
            q.execute(c).await?;
            Ok(())
        }

        async fn reset_cursor(c: &mut Conn, sub_id: i64, next: i64) -> Result<()> {
            let q = sqlx::query(sql::DROP_FROM).bind(sub_id).bind(next);
            q.execute(&mut *c).await?;
            let q = sqlx::query(sql::SET_CURSOR).bind(next - 1).bind(sub_id);
            q.execute(c).await?;
            Ok(())
        }

        async fn counters(c: &mut Conn, sub_id: i64) -> Result<(i64, i64, i64, i64)> {
            let q = sqlx::query_as(sql::COUNTERS).bind(sub_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn due_redeliveries(
            c: &mut Conn,
            sub: &SubRow,
            now: Micros,
            limit: i64,
        ) -> Result<Vec<(i32, StoredMessage)>> {
            let statement = if sub.settings.ordered {
                sql::DUE_ORDERED
            } else {
                sql::DUE
            };
            let rows = sqlx::query(statement)
                .bind(sub.id)
                .bind(now)
                .bind(sub.topic_id)
                .bind(limit)
                .fetch_all(c)
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, message_from_row(r, 1, &sub.topic)?)))
                .collect()
        }

        async fn next_due(c: &mut Conn, sub_id: i64, now: Micros) -> Result<Option<Micros>> {
            let q = sqlx::query_scalar(sql::NEXT_DUE).bind(sub_id).bind(now);
            Ok(q.fetch_one(c).await?)
        }

        async fn expired_leases(
            c: &mut Conn,
            sub_id: i64,
            now: Micros,
            limit: i64,
        ) -> Result<Vec<(i64, i32, Micros)>> {
            let q = sqlx::query_as(sql::EXPIRED_LEASES).bind(sub_id).bind(now);
            Ok(q.bind(limit).fetch_all(c).await?)
        }

        async fn set_waiting(
            c: &mut Conn,
            sub_id: i64,
            seq: i64,
            at: Micros,
            reason: Option<&str>,
        ) -> Result<()> {
            sqlx::query(sql::SET_WAITING)
                .bind(at)
                .bind(reason)
                .bind(sub_id)
                .bind(seq)
                .execute(c)
                .await?;
            Ok(())
        }

        async fn set_deadline(c: &mut Conn, sub_id: i64, seq: i64, deadline: Micros) -> Result<()> {
            let q = sqlx::query(sql::SET_DEADLINE).bind(deadline).bind(sub_id);
            q.bind(seq).execute(c).await?;
            Ok(())
        }

        async fn set_dead(
            c: &mut Conn,
            sub_id: i64,
            seq: i64,
            now: Micros,
            reason: &str,
        ) -> Result<()> {
            sqlx::query(sql::SET_DEAD)
                .bind(now)
                .bind(reason)
                .bind(sub_id)
                .bind(seq)
                .execute(c)
                .await?;
            Ok(())
        }

        async fn delivery_counts(c: &mut Conn, sub_id: i64, now: Micros) -> Result<DeliveryCounts> {
            let q = sqlx::query_as(sql::DELIVERY_COUNTS).bind(now).bind(sub_id);
            let (in_flight, undone, dead, first_undone, first_any) = q.fetch_one(c).await?;
            Ok(DeliveryCounts {
                in_flight,
                undone,
                dead,
                first_undone,
                first_any,
            })
        }

        async fn blocked_keys(
            c: &mut Conn,
            sub_id: i64,
            sample: i64,
        ) -> Result<(i64, Vec<String>)> {
            let q = sqlx::query_scalar(sql::BLOCKED_KEY_COUNT).bind(sub_id);
            let count = q.fetch_one(&mut *c).await?;
            let q = sqlx::query_scalar(sql::BLOCKED_KEYS)
                .bind(sub_id)
                .bind(sample);
            Ok((count, q.fetch_all(c).await?))
        }

        async fn dead_letters(
            c: &mut Conn,
            sub: &SubRow,
            after: i64,
            limit: i64,
        ) -> Result<Vec<DeadLetter>> {
            let rows = sqlx::query(sql::DEAD_LETTERS)
                .bind(sub.topic_id)
                .bind(sub.id)
                .bind(after)
                .bind(limit)
                .fetch_all(c)
                .await?;
            rows.iter()
                .map(|r| dead_letter_from_row(r, &sub.topic))
                .collect()
        }

        async fn undone(
            c: &mut Conn,
            sub: &SubRow,
            after: i64,
            limit: i64,
        ) -> Result<Vec<PeekedMessage>> {
            let rows = sqlx::query(sql::UNDONE)
                .bind(sub.topic_id)
                .bind(sub.id)
                .bind(after)
                .bind(limit)
                .fetch_all(c)
                .await?;
            let now = now_micros();
            rows.iter()
                .map(|r| peeked_from_row(r, &sub.topic, now))
                .collect()
        }

        async fn dead_count(c: &mut Conn, sub_id: i64) -> Result<i64> {
            let q = sqlx::query_scalar(sql::DEAD_COUNT).bind(sub_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn low_water(c: &mut Conn, topic_id: i64) -> Result<Option<i64>> {
            let q = sqlx::query_scalar(sql::LOW_WATER).bind(topic_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn delete_messages(
            c: &mut Conn,
            topic_id: i64,
            from: i64,
            to: i64,
            cutoff: Micros,
        ) -> Result<u64> {
            let done = sqlx::query(sql::DELETE_MESSAGES)
                .bind(topic_id)
                .bind(from)
                .bind(to)
                .bind(cutoff)
                .execute(c)
                .await?;
            Ok(done.rows_affected())
        }

        async fn any_message_in(c: &mut Conn, topic_id: i64, from: i64, to: i64) -> Result<bool> {
            let q = sqlx::query_scalar(sql::ANY_MESSAGE_IN)
                .bind(topic_id)
                .bind(from);
            Ok(q.bind(to).fetch_one(c).await?)
        }

        async fn message_times(
            c: &mut Conn,
            topic_id: i64,
            from: i64,
            limit: i64,
        ) -> Result<Vec<(i64, Micros)>> {
            let q = sqlx::query_as(sql::MESSAGE_TIMES)
                .bind(topic_id)
                .bind(from)
                .bind(limit);
            Ok(q.fetch_all(c).await?)
        }

        async fn next_deadline(c: &mut Conn, sub_id: i64) -> Result<Option<Micros>> {
            let q = sqlx::query_scalar(sql::NEXT_DEADLINE).bind(sub_id);
            Ok(q.fetch_one(c).await?)
        }

        async fn subs_with_expired_leases(
            c: &mut Conn,
            before: Micros,
            limit: i64,
        ) -> Result<Vec<String>> {
            let q = sqlx::query_scalar(sql::SUBS_WITH_EXPIRED_LEASES)
                .bind(before)
                .bind(limit);
            Ok(q.fetch_all(c).await?)
        }

        async fn expire_through(
            c: &mut Conn,
            topic_id: i64,
            last: i64,
            unacked: i64,
        ) -> Result<Vec<String>> {
            for statement in [sql::EXPIRE_MESSAGES, sql::EXPIRE_DELIVERIES] {
                let q = sqlx::query(statement).bind(topic_id).bind(last);
                q.execute(&mut *c).await?;
            }
            let q = sqlx::query_scalar(sql::MOVE_CURSORS_PAST)
                .bind(last)
                .bind(topic_id);
            let names = q.fetch_all(&mut *c).await?;
            let q = sqlx::query(sql::COUNT_EXPIRED).bind(unacked).bind(topic_id);
            q.execute(c).await?;
            Ok(names)
        }

        async fn release_held(c: &mut Conn, sub_id: i64, now: Micros) -> Result<()> {
            let q = sqlx::query(sql::RELEASE_HELD).bind(now).bind(sub_id);
            q.execute(c).await?;
            Ok(())
        }

        async fn heal_held(c: &mut Conn, topic_id: i64, now: Micros) -> Result<()> {
            let q = sqlx::query(sql::HEAL_HELD).bind(now).bind(topic_id);
            q.execute(c).await?;
            Ok(())
        }

        async fn prune_dedup(c: &mut Conn, before: Micros, limit: i64) -> Result<u64> {
            let q = sqlx::query(sql::PRUNE_DEDUP).bind(before).bind(limit);
            Ok(q.execute(c).await?.rows_affected())
        }

        async fn topic_gauges(c: &mut Conn) -> Result<Vec<(String, i64, Option<i64>, i64)>> {
            Ok(sqlx::query_as(sql::TOPIC_GAUGES).fetch_all(c).await?)
        }

        async fn subscription_gauges(
            c: &mut Conn,
            now: Micros,
        ) -> Result<Vec<super::counts::GaugeRow>> {
            let q = sqlx::query_as(sql::SUBSCRIPTION_GAUGES).bind(now);
            Ok(q.fetch_all(c).await?)
        }
    };
}
