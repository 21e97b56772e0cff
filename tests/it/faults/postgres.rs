//! PostgreSQL faults: the broker's connections terminated by the server
//! (`pg_terminate_backend`), and its database refusing connections
//! (`ALLOW_CONNECTIONS false`, then every connection terminated) for a
//! while.

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::time::sleep;

use super::broker::BrokerProcess;
use super::load::LoadConfig;
use super::{Fresh, Params, Run, postgres_admin_url};
use crate::harness::Backend;

/// Short database bounds, so that a dead connection is noticed and replaced
/// within the clients' deadlines.
pub(super) const SHORT_BOUNDS: [&str; 6] = [
    "--statement-timeout",
    "1s",
    "--commit-timeout",
    "1s",
    "--database-connect-timeout",
    "1s",
];

/// An administrative connection to the server the tests use.
async fn admin(admin_url: &str) -> PgConnection {
    PgConnection::connect(admin_url)
        .await
        .expect("PostgreSQL reachable")
}

/// Terminates every connection to `database` but the caller's; returns
/// how many there were.
async fn terminate(admin_url: &str, database: &str) -> usize {
    let mut c = admin(admin_url).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(&mut c)
    .await
    .expect("terminate the broker's connections");
    killed.len()
}

/// Lets `database` accept connections, or refuse them.
async fn allow_connections(admin_url: &str, database: &str, allow: bool) {
    let mut c = admin(admin_url).await;
    // A name made by `fresh_database`: letters, digits and underscores.
    assert!(
        database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS {allow}"
    )))
    .execute(&mut c)
    .await
    .expect("alter the database");
}

/// Alternates two faults under load: every connection of the broker
/// terminated, three times in a row; and the database refusing new
/// connections while the open ones are terminated, for a while.
#[tokio::test]
async fn terminated_and_refused_postgres_connections_lose_nothing() {
    let Some(admin_url) = postgres_admin_url() else {
        return;
    };
    let params = Params::from_env();
    let fresh = Fresh::new(&Backend::Postgres(admin_url.clone())).await;
    let database = fresh.database_name().expect("a PostgreSQL database");
    let broker = BrokerProcess::start(fresh.storage(), &SHORT_BOUNDS).await;
    let name = "PostgreSQL connections terminated and refused";
    let mut run = Run::start(name, &broker.url(), params, LoadConfig::new(params.seed)).await;
    let mut terminated = 0;
    for cycle in 0..params.cycles {
        run.next_cycle().await;
        if cycle % 2 == 0 {
            for _ in 0..3 {
                terminated += terminate(&admin_url, &database).await;
                sleep(run.fault_span() / 3).await;
            }
        } else {
            allow_connections(&admin_url, &database, false).await;
            terminated += terminate(&admin_url, &database).await;
            sleep(run.fault_span()).await;
            allow_connections(&admin_url, &database, true).await;
        }
    }
    run.recovered().await;
    run.finish(&broker.url()).await;
    assert!(terminated > 0, "{name}: no connection was terminated");
    drop(broker);
    fresh.remove().await;
}
