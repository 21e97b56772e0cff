//! Partitions between a broker and its PostgreSQL database (issue 16): a
//! black-holed or frozen link fails publishes with UNAVAILABLE within the
//! configured bound and turns health NOT_SERVING; healed or replaced, it
//! serves again by itself, and nothing acked is lost.

use std::collections::HashSet;
use std::time::Duration;

use tidings::client::Serving;
use tidings::proto;
use tidings::server::ServerConfig;
use tidings::store::Storage;

use crate::harness::{Backend, TestBroker, payload};
use crate::proxy::{Proxy, through, upstream_of};

/// The statement, commit and connect bounds of these tests.
const BOUND: Duration = Duration::from_secs(1);

/// How long a test waits for anything before it declares it hung: far
/// above [`BOUND`], so that only a hang fails it.
const PATIENCE: Duration = Duration::from_secs(20);

/// Routes the broker's database through `proxy`, with short bounds.
fn via(proxy: &Proxy) -> impl FnOnce(&mut ServerConfig) + '_ {
    move |config| {
        if let Storage::Postgres(url) = &config.store.storage {
            config.store.storage = Storage::Postgres(through(url, proxy.addr()));
        }
        config.store.statement_timeout = BOUND;
        config.store.commit_timeout = BOUND;
        config.store.connect_timeout = BOUND;
    }
}

/// A broker on a fresh PostgreSQL database reached through a proxy, with
/// topic `t` and subscription `s`; `None` without PostgreSQL.
async fn broker_behind_proxy() -> Option<(Proxy, TestBroker)> {
    let Some(Backend::Postgres(admin)) = Backend::postgres() else {
        return None;
    };
    let proxy = Proxy::start(upstream_of(&admin)).await;
    let b = TestBroker::start_with(Backend::Postgres(admin), via(&proxy)).await;
    b.topic_and_sub("t", "s", |_| {}).await;
    Some((proxy, b))
}

/// Publishes payload `text` to `t`, failing the test if no answer comes.
async fn publish(b: &TestBroker, text: &str) -> Result<(), tonic::Status> {
    let message = crate::harness::wire(tidings::client::Outgoing::new("t", text.as_bytes()));
    let request = proto::PublishRequest {
        messages: vec![message],
    };
    match tokio::time::timeout(PATIENCE, b.raw_publisher().publish(request)).await {
        Ok(answer) => answer.map(|_| ()),
        Err(_) => panic!("a publish got no answer in {PATIENCE:?}: the broker hangs"),
    }
}

/// Publishes payloads `prefix-0`, `prefix-1`, ... that must succeed.
async fn publish_ok(b: &TestBroker, prefix: &str, n: usize, acked: &mut HashSet<String>) {
    for i in 0..n {
        let text = format!("{prefix}-{i}");
        publish(b, &text).await.expect("publish on a healthy link");
        acked.insert(text);
    }
}

/// Publishes until one is acked, as a client retrying UNAVAILABLE would;
/// returns how many were refused first.
async fn publish_until_acked(b: &TestBroker, text: &str, acked: &mut HashSet<String>) -> u32 {
    let give_up = tokio::time::Instant::now() + PATIENCE;
    let mut refused = 0;
    loop {
        match publish(b, text).await {
            Ok(()) => {
                acked.insert(text.to_owned());
                return refused;
            }
            Err(s) if s.code() == tonic::Code::Unavailable => refused += 1,
            Err(s) => panic!("a publish failed with {:?}: {}", s.code(), s.message()),
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "publishes still refused after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the broker's health reads `want`.
async fn health_becomes(b: &TestBroker, want: Serving) {
    let admin = b.admin();
    let waited = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(now) = admin.health("").await
                && now == want
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "health did not become {want:?} in {PATIENCE:?}"
    );
}

/// Every acked payload can be pulled from subscription `s`.
async fn nothing_acked_is_lost(b: &TestBroker, acked: &HashSet<String>) {
    let mut seen = HashSet::new();
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while !acked.is_subset(&seen) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "acked but never delivered: {:?}",
            acked.difference(&seen).collect::<Vec<_>>()
        );
        let got = b.pull("s", 1000, Duration::from_millis(200)).await;
        let ids = got.iter().map(|m| m.ack_id.clone()).collect::<Vec<_>>();
        seen.extend(got.iter().map(|m| payload(&m)));
        if !ids.is_empty() {
            b.ack("s", ids).await.expect("ack");
        }
    }
}

#[tokio::test]
async fn a_black_holed_database_fails_publishes_fast_and_health_returns_when_healed() {
    let Some((proxy, b)) = broker_behind_proxy().await else {
        return;
    };
    let mut acked = HashSet::new();
    publish_ok(&b, "before", 5, &mut acked).await;

    proxy.black_hole();
    let err = publish(&b, "during")
        .await
        .expect_err("no commit on a dead link");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
    health_becomes(&b, Serving::NotServing).await;
    // While the link stays dead, each publish fails within the bounds
    // rather than waiting for the link.
    let err = publish(&b, "during-2").await.expect_err("still dead");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
    let err = b
        .admin()
        .get_topic("t")
        .await
        .expect_err("no read on a dead link");
    assert!(err.is_retryable(), "{err}");

    proxy.heal();
    // The maintenance rounds commit by themselves: health returns without
    // any request.
    health_becomes(&b, Serving::Serving).await;
    publish_until_acked(&b, "after-heal", &mut acked).await;
    publish_ok(&b, "after", 5, &mut acked).await;
    b.admin().get_topic("t").await.expect("reads work again");
    nothing_acked_is_lost(&b, &acked).await;
    b.stop().await;
}

#[tokio::test]
async fn a_frozen_database_link_is_detected_and_replaced() {
    let Some((proxy, b)) = broker_behind_proxy().await else {
        return;
    };
    let mut acked = HashSet::new();
    publish_ok(&b, "before", 5, &mut acked).await;
    let connections = proxy.accepted();

    // Every connection open now never carries a byte again, and is never
    // closed; new ones pass. Only noticing the silence and reconnecting
    // gets the broker going.
    proxy.freeze();
    publish_until_acked(&b, "after-freeze", &mut acked).await;
    assert!(
        proxy.accepted() > connections,
        "the broker committed without a new connection"
    );
    health_becomes(&b, Serving::Serving).await;
    publish_ok(&b, "after", 5, &mut acked).await;
    let give_up = tokio::time::Instant::now() + PATIENCE;
    // The read pool drops its frozen connections one read at a time.
    while b.admin().get_topic("t").await.is_err() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "reads never recovered"
        );
    }
    nothing_acked_is_lost(&b, &acked).await;
    b.stop().await;
}

#[tokio::test]
async fn a_relay_survives_a_black_holed_outbox_database_and_relays_each_row_once() {
    use crate::outbox::{AppDb, receive, relay_config, stored};
    use tidings::config::DatabaseTimeouts;
    use tidings::outbox::{Message, Outbox, Relay};

    let Some(backend) = Backend::postgres() else {
        return;
    };
    let Backend::Postgres(admin) = &backend else {
        return;
    };
    let broker = TestBroker::start(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    // The application writes directly; only the relay goes through the
    // proxy.
    let app = AppDb::create(&backend).await;
    let proxy = Proxy::start(upstream_of(admin)).await;
    let timeouts = DatabaseTimeouts {
        statement: BOUND,
        operation: BOUND,
        connect: BOUND,
    };
    let outbox = Outbox::connect_with(&through(app.url(), proxy.addr()), timeouts)
        .await
        .expect("outbox through the proxy");
    let relay = Relay::start(outbox, relay_config(&broker))
        .await
        .expect("relay");
    let mut status = relay.watch();
    let before: Vec<Message> = (0..20)
        .map(|i| Message::new("orders", format!("a{i}")))
        .collect();
    app.enqueue(&before, true).await;
    let waited = tokio::time::timeout(PATIENCE, status.wait_for(|s| s.published >= 20))
        .await
        .is_ok();
    assert!(waited, "relay publishes on a healthy link");

    proxy.black_hole();
    let during: Vec<Message> = (0..30)
        .map(|i| Message::new("orders", format!("b{i}")))
        .collect();
    app.enqueue(&during, true).await;
    // The relay notices: its work fails (or it loses the lead) within the
    // bound instead of waiting on the dead link for ever.
    let noticed = tokio::time::timeout(
        PATIENCE,
        status.wait_for(|s| s.last_error.is_some() || !s.leader),
    )
    .await
    .is_ok();
    assert!(noticed, "the relay hangs on a black-holed database");

    proxy.heal();
    let waited = tokio::time::timeout(
        PATIENCE,
        status.wait_for(|s| s.published >= 50 && s.leader && s.last_error.is_none()),
    )
    .await
    .is_ok();
    assert!(waited, "the relay did not recover: {:?}", relay.status());
    let mut sub = broker.subscribe("s");
    let got = receive(&mut sub, 50).await;
    let ids: Vec<_> = got.iter().map(|m| m.message.id).collect();
    let want: Vec<_> = before.iter().chain(&during).map(|m| m.id).collect();
    assert_eq!(ids, want, "every row once, in order");
    assert_eq!(stored(&broker, "orders").await, 50, "nothing stored twice");
    relay.stop().await;
    assert_eq!(app.depth().await, 0, "acked rows are deleted");
    app.drop().await;
    broker.stop().await;
}

/// Issue 16: a leader relay whose database link freezes (no byte, no reset,
/// ever) kept its session, and with it the advisory leader lock, so no
/// standby could take over. The server now ends the silent session within
/// the leader timeout; the standby takes over and relays every row once.
#[tokio::test]
async fn a_standby_relay_takes_over_from_a_leader_whose_link_froze() {
    use crate::outbox::{AppDb, receive, relay_config, stored};
    use tidings::config::DatabaseTimeouts;
    use tidings::outbox::{Message, Outbox, Relay};

    let Some(backend) = Backend::postgres() else {
        return;
    };
    let Backend::Postgres(admin) = &backend else {
        return;
    };
    let broker = TestBroker::start(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    let app = AppDb::create(&backend).await;
    let proxy = Proxy::start(upstream_of(admin)).await;
    let timeouts = DatabaseTimeouts {
        statement: BOUND,
        operation: BOUND,
        connect: BOUND,
    };
    let mut config = relay_config(&broker);
    config.leader_timeout = 2 * BOUND;
    // The leader reaches its database through the proxy; the standby
    // directly.
    let leader_outbox = Outbox::connect_with(&through(app.url(), proxy.addr()), timeouts)
        .await
        .expect("outbox through the proxy");
    let leader = Relay::start(leader_outbox, config.clone())
        .await
        .expect("leader relay");
    let mut leading = leader.watch();
    let waited = tokio::time::timeout(PATIENCE, leading.wait_for(|s| s.leader))
        .await
        .is_ok();
    assert!(waited, "the first relay never led");
    let standby_outbox = Outbox::connect_with(app.url(), timeouts)
        .await
        .expect("outbox");
    let standby = Relay::start(standby_outbox, config)
        .await
        .expect("standby relay");
    let mut standing = standby.watch();

    let before: Vec<Message> = (0..20)
        .map(|i| Message::new("orders", format!("a{i}")))
        .collect();
    app.enqueue(&before, true).await;
    let waited = tokio::time::timeout(PATIENCE, leading.wait_for(|s| s.published >= 20))
        .await
        .is_ok();
    assert!(waited, "the leader publishes on a healthy link");
    assert!(!standby.status().leader, "two leaders at once");

    // Nothing passes the leader's link any more, old connections or new,
    // and nothing resets it: to the server its session just goes quiet.
    proxy.black_hole();
    let frozen = std::time::Instant::now();
    let during: Vec<Message> = (0..30)
        .map(|i| Message::new("orders", format!("b{i}")))
        .collect();
    app.enqueue(&during, true).await;
    let took_over = tokio::time::timeout(PATIENCE, standing.wait_for(|s| s.leader))
        .await
        .is_ok();
    assert!(
        took_over,
        "the standby never took over from the frozen leader"
    );
    eprintln!(
        "the standby took over {:?} after the freeze",
        frozen.elapsed()
    );
    // The frozen leader noticed its lock checks fail and stood down.
    let stood_down = tokio::time::timeout(PATIENCE, leading.wait_for(|s| !s.leader))
        .await
        .is_ok();
    assert!(stood_down, "the frozen leader still acts as leader");

    let mut sub = broker.subscribe("s");
    let got = receive(&mut sub, 50).await;
    let ids: Vec<_> = got.iter().map(|m| m.message.id).collect();
    let want: Vec<_> = before.iter().chain(&during).map(|m| m.id).collect();
    assert_eq!(ids, want, "every row once, in order");
    assert_eq!(stored(&broker, "orders").await, 50, "nothing stored twice");
    standby.stop().await;
    assert_eq!(app.depth().await, 0, "acked rows are deleted");
    drop(leader);
    drop(proxy);
    app.drop().await;
    broker.stop().await;
}

/// The client ports of the sessions of `url`'s database whose last
/// statement was LISTEN on `channel`.
async fn listening_ports(url: &str, channel: &str) -> Vec<u16> {
    use sqlx::Connection;
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .expect("connect");
    let ports: Vec<i32> = sqlx::query_scalar(
        "SELECT client_port FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE $1",
    )
    .bind(format!("LISTEN \"{channel}\"%"))
    .fetch_all(&mut conn)
    .await
    .expect("pg_stat_activity");
    ports
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

/// Issue 16: a relay's LISTEN connection whose link froze was never
/// noticed: with a long poll interval, committed rows waited for the poll.
/// Now the silence is checked with a ping, the connection replaced, and the
/// outbox looked at.
#[tokio::test]
async fn a_relay_whose_listen_link_froze_replaces_it_and_relays_promptly() {
    use crate::outbox::{AppDb, receive, relay_config};
    use tidings::config::DatabaseTimeouts;
    use tidings::outbox::{Message, Outbox, Relay};

    let Some(backend) = Backend::postgres() else {
        return;
    };
    let Backend::Postgres(admin) = &backend else {
        return;
    };
    let broker = TestBroker::start(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    let app = AppDb::create(&backend).await;
    let proxy = Proxy::start(upstream_of(admin)).await;
    let timeouts = DatabaseTimeouts {
        statement: BOUND,
        operation: BOUND,
        connect: BOUND,
    };
    let outbox = Outbox::connect_with(&through(app.url(), proxy.addr()), timeouts)
        .await
        .expect("outbox through the proxy");
    let mut config = relay_config(&broker);
    // Far longer than the test waits: only a wake-up relays in time.
    config.poll_interval = Duration::from_secs(120);
    config.listen_check_interval = Duration::from_millis(300);
    let relay = Relay::start(outbox, config).await.expect("relay");
    let mut status = relay.watch();
    let led = tokio::time::timeout(PATIENCE, status.wait_for(|s| s.leader))
        .await
        .is_ok();
    assert!(led, "the relay never led");
    let mut sub = broker.subscribe("s");
    let first = Message::new("orders", "before");
    app.enqueue(std::slice::from_ref(&first), true).await;
    assert_eq!(receive(&mut sub, 1).await[0].message.id, first.id);

    // Only the LISTEN connection freezes; the relay's others, and new
    // ones, pass.
    let listening = listening_ports(app.url(), "tidings_outbox").await;
    assert_eq!(
        proxy.freeze_ports(&listening),
        1,
        "one LISTEN via the proxy"
    );
    let frozen = std::time::Instant::now();
    let during = Message::new("orders", "during");
    app.enqueue(std::slice::from_ref(&during), true).await;
    assert_eq!(receive(&mut sub, 1).await[0].message.id, during.id);
    eprintln!("relayed {:?} after the freeze", frozen.elapsed());
    // The new LISTEN connection wakes the relay as the old one did.
    let after = Message::new("orders", "after");
    app.enqueue(std::slice::from_ref(&after), true).await;
    let got = tokio::time::timeout(PATIENCE, receive(&mut sub, 1)).await;
    assert_eq!(got.expect("woken in time")[0].message.id, after.id);

    drop(sub);
    relay.stop().await;
    drop(proxy);
    app.drop().await;
    broker.stop().await;
}

/// Issue 16: a broker's LISTEN connection (other instances' wake-ups)
/// whose link froze left its subscribers to the poll interval, silently.
/// Now it is checked, replaced, and every waiter woken.
#[tokio::test]
async fn a_broker_whose_listen_link_froze_replaces_it_and_wakes_subscribers() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let Backend::Postgres(admin) = &backend else {
        return;
    };
    let proxy = Proxy::start(upstream_of(admin)).await;
    let backend = backend.clone();
    // Far longer than the test waits: only a wake-up delivers in time.
    let slow_poll = |c: &mut ServerConfig| c.limits.poll_interval = Duration::from_secs(120);
    let a = TestBroker::start_with(backend, slow_poll).await;
    let b = a
        .another(|c| {
            slow_poll(c);
            via(&proxy)(c);
            c.store.listen_check_interval = Duration::from_millis(300);
        })
        .await;
    a.topic_and_sub("t", "s", |_| {}).await;
    let mut sub = b.subscribe("s");
    let url = a.database_url().expect("PostgreSQL").to_owned();
    a.publish("t", &["before"]).await;
    let m = next(&mut sub).await;
    assert_eq!(payload(&m), "before");
    sub.ack(vec![m.ack_id.to_string()]);

    // The ack committed, so nothing local is about to wake the stream.
    settled(&b).await;
    // Only b's LISTEN connection freezes (a's does not pass the proxy).
    let listening = listening_ports(&url, "tidings").await;
    assert_eq!(
        proxy.freeze_ports(&listening),
        1,
        "one LISTEN via the proxy"
    );
    let frozen = std::time::Instant::now();
    a.publish("t", &["during"]).await;
    let m = next(&mut sub).await;
    assert_eq!(payload(&m), "during");
    sub.ack(vec![m.ack_id.to_string()]);
    settled(&b).await;
    eprintln!("delivered {:?} after the freeze", frozen.elapsed());
    a.publish("t", &["after"]).await;
    let m = next(&mut sub).await;
    assert_eq!(payload(&m), "after");
    sub.ack(vec![m.ack_id.to_string()]);

    drop(sub);
    b.stop().await;
    drop(proxy);
    a.stop().await;
}

/// The next delivery on `sub`, which must come well before the poll.
async fn next(sub: &mut tidings::client::Subscription) -> tidings::model::Delivery {
    tokio::time::timeout(PATIENCE, sub.next_message())
        .await
        .expect("delivered without waiting for the poll")
        .expect("subscription open")
        .expect("no error")
}

/// Waits until subscription `s` on `b` has nothing in flight.
async fn settled(b: &TestBroker) {
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while b.stats("s").await.in_flight > 0 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the ack never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
