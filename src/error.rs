//! The library's one error type, sized for callers.

/// Everything that can go wrong in the broker, the store or the client.
///
/// User errors carry a message that names the problem; `Storage` carries the
/// underlying cause for the log and is shown to clients as an opaque internal
/// error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request is malformed: a bad id, name, size or value.
    #[error("{0}")]
    InvalidArgument(String),
    /// A named topic, subscription or dead letter does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A topic or subscription of that name exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the state forbids it (a stale lease, a topic
    /// that still has subscriptions).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Retryable: storage unreachable, or the broker is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// An unexpected storage failure; nothing was committed.
    #[error("storage error: {0}")]
    Storage(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True for errors a client should retry after a backoff.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// SQLite failing to write at all (disk full, I/O error, a file it cannot
/// open): storage is unavailable, whatever the request was.
#[cfg(feature = "sqlite")]
fn sqlite_cannot_write(d: &dyn sqlx::error::DatabaseError) -> bool {
    const IOERR: i32 = 10;
    const FULL: i32 = 13;
    const CANTOPEN: i32 = 14;
    d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
        && d.code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, IOERR | FULL | CANTOPEN))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite_cannot_write(_: &dyn sqlx::error::DatabaseError) -> bool {
    false
}

impl From<sqlx::Error> for Error {
    /// Maps a database error: lost connections, serialization failures,
    /// deadlocks, timeouts, a busy SQLite file and a server shutting down are
    /// retryable (`Unavailable`); anything else is a `Storage` error.
    fn from(e: sqlx::Error) -> Error {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Error::Unavailable(format!("storage unavailable: {e}")),
            // PostgreSQL refusing or dropping connections, out of
            // resources, or shutting down: the classes of connection
            // exceptions (08), insufficient resources (53), operator
            // intervention (57) and system errors (58).
            sqlx::Error::Database(d)
                if d.code().is_some_and(|c| {
                    c.len() == 5 && ["08", "53", "57", "58"].contains(&&c[..2])
                }) || sqlite_cannot_write(d.as_ref()) =>
            {
                Error::Unavailable(format!("storage unavailable: {e}"))
            }
            sqlx::Error::Database(d)
                if matches!(
                    d.code().as_deref(),
                    // PostgreSQL: serialization failure, deadlock, admin
                    // shutdown, starting up, a statement or lock wait
                    // cancelled by its timeout. SQLite: busy, locked.
                    Some(
                        "40001"
                            | "40P01"
                            | "57P01"
                            | "57P03"
                            | "57014"
                            | "55P03"
                            | "5"
                            | "6"
                            | "517"
                    )
                ) =>
            {
                Error::Unavailable(format!("storage conflict, retry: {e}"))
            }
            _ => Error::Storage(e.to_string()),
        }
    }
}
