//! Configuration shared by the command line and the library's entry points:
//! the one duration parser, the checks that keep a configured duration from
//! panicking a background task later, and the defaults the CLI shows.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::server::ServerConfig;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::store::StoreConfig;

/// The address `tidings serve` listens on unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// The broker the client commands talk to unless told otherwise.
pub const DEFAULT_BROKER: &str = "http://127.0.0.1:50051";

/// The folder of the embedded SQLite database unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "./tidings-data";

/// The longest duration any setting accepts: 100 years. Longer ones would
/// overflow an `Instant` or a count of microseconds somewhere; no setting
/// needs more.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `500ms`, `30s`, `5m`, `2h`, `7d`, `250us` or plain seconds
/// (fractions allowed: `1.5s`).
///
/// Fails with `InvalidArgument` for anything else, a negative value, or a
/// duration longer than [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration> {
    let s = text.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let not_a_duration =
        || Error::InvalidArgument(format!("{text:?} is not a duration like 30s, 500ms or 7d"));
    let nanos_per_unit: u128 = match unit {
        "" | "s" => 1_000_000_000,
        "ms" => 1_000_000,
        "us" | "µs" => 1_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "unknown unit {unit:?} in {text:?}; use us, ms, s, m, h or d"
            )));
        }
    };
    let too_long = || {
        Error::InvalidArgument(format!(
            "{text:?} is too long; the longest accepted duration is {}",
            format_duration(MAX_DURATION)
        ))
    };
    // Whole and fractional parts in integers, so that `0.1s` is exactly
    // 100ms and an absurd number is refused instead of overflowing.
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(not_a_duration());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_long())?
    };
    // The whole part is bounded before the fraction is added: the fraction
    // adds up to one unit, which past u128::MAX less a unit would wrap
    // (issue 12: `3938453320844195178974243.9d` was 18 hours).
    let max = MAX_DURATION.as_nanos();
    let mut nanos = whole
        .checked_mul(nanos_per_unit)
        .filter(|n| *n <= max)
        .ok_or_else(too_long)?;
    // The fraction as one integer over its power of ten, so that each digit
    // counts at its exact weight: a place value divided down digit by digit
    // loses its own fraction (3.6e12 ns, an hour's, became 3 at the twelfth
    // digit). Twenty digits are more than a nanosecond of a day needs, and
    // with the largest unit stay far inside u128.
    let digits = &fraction.as_bytes()[..fraction.len().min(20)];
    let scaled = digits
        .iter()
        .fold(0u128, |f, d| f * 10 + u128::from(d - b'0'));
    nanos += scaled * nanos_per_unit / 10u128.pow(digits.len() as u32);
    if nanos > max {
        return Err(too_long());
    }
    // At most MAX_DURATION, so the seconds fit in a u64.
    let d = Duration::new(
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    );
    Ok(d)
}

/// Parses the period of something repeated, as [`parse_duration`] does.
///
/// Fails with `InvalidArgument` as [`parse_duration`] does, and for zero.
pub fn parse_interval(text: &str) -> Result<Duration> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(Error::InvalidArgument(format!(
            "{text:?}: an interval must be longer than zero"
        )));
    }
    Ok(d)
}

/// Writes a duration in the largest unit that keeps it whole (`7d`, `250ms`),
/// in a form [`parse_duration`] reads back.
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(&str, u128); 5] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    for (unit, size) in UNITS {
        if nanos.is_multiple_of(size) {
            return format!("{}{unit}", nanos / size);
        }
    }
    // Microseconds with their fraction in exact decimal digits: through
    // f64 a long duration lost its last nanoseconds (issue 12).
    let (us, ns) = (nanos / 1_000, nanos % 1_000);
    if ns == 0 {
        format!("{us}us")
    } else {
        format!("{us}.{}us", format!("{ns:03}").trim_end_matches('0'))
    }
}

/// A duration read and shown as text (`30s`), for flags whose default is a
/// library constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        parse_duration(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

/// Checks a duration setting named `what`.
///
/// Fails with `InvalidArgument` if it is longer than [`MAX_DURATION`].
pub fn check_duration(what: &str, d: Duration) -> Result<()> {
    if d > MAX_DURATION {
        return Err(Error::InvalidArgument(format!(
            "{what} is {d:?}; the longest accepted is {}",
            format_duration(MAX_DURATION)
        )));
    }
    Ok(())
}

/// Checks the period of something repeated, named `what`.
///
/// Fails with `InvalidArgument` if it is zero (a timer that fires
/// continuously, which `tokio::time::interval` refuses with a panic) or
/// longer than [`MAX_DURATION`].
pub fn check_interval(what: &str, d: Duration) -> Result<()> {
    if d.is_zero() {
        return Err(Error::InvalidArgument(format!(
            "{what} must be longer than zero"
        )));
    }
    check_duration(what, d)
}

/// How long a client of a database (the relay on its outbox, the consumer
/// on its inbox) waits on it, so that a dead link fails its work with a
/// retryable error instead of hanging it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseTimeouts {
    /// PostgreSQL cancels a statement running, or waiting for a lock,
    /// longer than this; a session idle in a transaction for `operation`
    /// is ended (its locks released).
    pub statement: Duration,
    /// Longest one operation (a fetch, a delete, a begin, a commit) may take
    /// on this side before it fails with `Unavailable`: what notices a link
    /// that drops packets and never resets.
    pub operation: Duration,
    /// Longest a new or pooled connection may take to be had.
    pub connect: Duration,
}

impl Default for DatabaseTimeouts {
    /// 5 s per statement, 10 s per operation, 5 s to connect: the broker's
    /// own defaults.
    fn default() -> Self {
        DatabaseTimeouts {
            statement: Duration::from_secs(5),
            operation: Duration::from_secs(10),
            connect: Duration::from_secs(5),
        }
    }
}

impl DatabaseTimeouts {
    /// Checks the bounds before a pool is opened with them.
    ///
    /// Fails with `InvalidArgument` for a zero or absurd bound.
    pub fn check(&self) -> Result<()> {
        check_interval("statement_timeout", self.statement)?;
        check_interval("operation timeout", self.operation)?;
        check_interval("connect_timeout", self.connect)
    }

    /// PostgreSQL's startup options for these bounds; see
    /// [`postgres_session_bounds`].
    #[cfg(feature = "postgres")]
    pub(crate) fn postgres_options(&self) -> [(&'static str, String); 6] {
        postgres_session_bounds(self.statement, self.operation)
    }
}

/// The server-side bounds of a PostgreSQL session, as startup options: a
/// statement or a lock wait past `statement` is cancelled, a session idle
/// inside a transaction for `idle_in_transaction` is ended (its client has
/// given up on it, and its row locks must not outlive that), and the server
/// probes an idle client's TCP link so that a vanished client's session
/// does not linger. (sqlx 0.9 offers no client-side TCP keepalive; the
/// callers' own deadlines notice a dead link on that side.)
#[cfg(feature = "postgres")]
pub(crate) fn postgres_session_bounds(
    statement: Duration,
    idle_in_transaction: Duration,
) -> [(&'static str, String); 6] {
    [
        ("statement_timeout", pg_millis(statement)),
        ("lock_timeout", pg_millis(statement)),
        (
            "idle_in_transaction_session_timeout",
            pg_millis(idle_in_transaction),
        ),
        ("tcp_keepalives_idle", "10".into()),
        ("tcp_keepalives_interval", "5".into()),
        ("tcp_keepalives_count", "3".into()),
    ]
}

/// A duration as PostgreSQL's milliseconds: rounded up, so that a short
/// bound never becomes 0 (which means none), and at most what the server
/// accepts.
#[cfg(feature = "postgres")]
pub(crate) fn pg_millis(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000).clamp(1, i32::MAX as u128);
    ms.to_string()
}

/// Checks the durations of a store's configuration before it is opened.
///
/// Fails with `InvalidArgument` naming the first bad setting.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub fn check_store_config(config: &StoreConfig) -> Result<()> {
    check_interval("maintenance_interval", config.maintenance_interval)?;
    check_interval("statement_timeout", config.statement_timeout)?;
    check_interval("commit_timeout", config.commit_timeout)?;
    check_interval("connect_timeout", config.connect_timeout)?;
    check_interval("listen_check_interval", config.listen_check_interval)?;
    check_duration("dedup_window", config.dedup_window)
}

/// Checks the durations of a server's configuration, its store's included,
/// before the server starts.
///
/// Fails with `InvalidArgument` naming the first bad setting.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub fn check_server_config(config: &ServerConfig) -> Result<()> {
    check_store_config(&config.store)?;
    check_interval("poll_interval", config.limits.poll_interval)?;
    check_interval("keepalive_interval", config.keepalive_interval)?;
    check_interval("keepalive_timeout", config.keepalive_timeout)?;
    check_duration("shutdown_timeout", config.drain_timeout)?;
    check_interval("idle_timeout", config.network.idle_timeout)?;
    check_interval("tls_handshake_timeout", config.network.handshake_timeout)?;
    check_interval("tls_reload_interval", config.network.tls_reload_interval)?;
    if config.network.max_connections == 0 {
        return Err(Error::InvalidArgument(
            "max_connections is 0: no client could connect".into(),
        ));
    }
    check_limits(config)
}

/// Room a message needs in a publish request besides its bytes: its id,
/// topic name and framing.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
const REQUEST_OVERHEAD: usize = 1024;

/// Checks that the size limits fit together: a message at the limit fits
/// in a request, and responses may carry something.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn check_limits(config: &ServerConfig) -> Result<()> {
    let limits = &config.limits;
    if limits.max_message_bytes == 0 {
        return Err(Error::InvalidArgument("max_message_bytes is 0".into()));
    }
    if limits.max_message_bytes + REQUEST_OVERHEAD > config.max_request_bytes {
        return Err(Error::InvalidArgument(format!(
            "max_message_bytes ({}) does not fit in max_request_bytes ({}): a message at the \
             limit could never be published; raise max_request_bytes to at least {}",
            limits.max_message_bytes,
            config.max_request_bytes,
            limits.max_message_bytes + REQUEST_OVERHEAD
        )));
    }
    if limits.max_response_bytes == 0 || limits.max_response_bytes > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "max_response_bytes {} is out of range (1 to {})",
            limits.max_response_bytes,
            i32::MAX
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("250us", Duration::from_micros(250)),
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("30", Duration::from_secs(30)),
            ("1.5s", Duration::from_millis(1500)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("7d", Duration::from_secs(7 * 86_400)),
            (" 0 ", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn refuses_garbage_negative_and_absurd_durations() {
        for text in ["", "s", "-1s", "1e3s", "5 parsecs", "1.2.3s", "inf", "NaN"] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        let err = parse_duration("99999999999999999999999s").unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        assert!(parse_duration("36501d").is_err());
        assert_eq!(parse_duration("36500d").unwrap(), MAX_DURATION);
    }

    #[test]
    fn formats_in_the_largest_whole_unit_and_reads_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_micros(1500), "1500us"),
            (Duration::from_nanos(1_500), "1.5us"),
            (Duration::from_nanos(7), "0.007us"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text).unwrap(), d);
        }
    }

    /// Issue 12, found by the fuzzer: a long duration with nanoseconds
    /// printed through f64 (`342876446007040.4us`) and read back rounded.
    #[test]
    fn long_durations_with_nanoseconds_read_back_exactly() {
        for d in [
            Duration::new(342_876_446, 7_040_377),
            MAX_DURATION - Duration::from_nanos(1),
            Duration::new(1, 1),
        ] {
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d, "{d:?}");
        }
    }

    /// Issue 12, found by the fuzzer: each digit of a fraction counted at
    /// a place value divided down in integers, so `1.777…h` came out 7 ns
    /// short of what it says.
    #[test]
    fn fractions_count_every_digit_at_its_weight() {
        let text = format!("1.{}5h", "7".repeat(56));
        assert_eq!(
            parse_duration(&text).unwrap(),
            Duration::new(6399, 999_999_999)
        );
        assert_eq!(
            parse_duration("0.123456789123d").unwrap(),
            Duration::from_nanos(10_666_666_580_227)
        );
    }

    /// Issue 12: a whole part just under u128::MAX nanoseconds plus a
    /// fraction overflowed (a panic in a debug build, a wrapped, short
    /// duration in a release build) instead of being refused as too long.
    #[test]
    fn a_fraction_on_an_absurd_number_is_refused_not_wrapped() {
        for text in [
            "3938453320844195178974243.9d",
            "340282366920938463463374607431.9s",
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.to_string().contains("too long"), "{text}: {err}");
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_bounds_never_round_to_zero_or_overflow() {
        let bounds = postgres_session_bounds(Duration::from_micros(10), Duration::MAX);
        assert_eq!(bounds[0], ("statement_timeout", "1".to_owned()));
        assert_eq!(bounds[2].1, i32::MAX.to_string());
        assert!(DatabaseTimeouts::default().check().is_ok());
    }

    #[test]
    fn intervals_must_be_positive_and_bounded() {
        assert!(check_interval("x", Duration::ZERO).is_err());
        assert!(check_interval("x", MAX_DURATION + Duration::from_secs(1)).is_err());
        assert!(check_interval("x", Duration::from_millis(1)).is_ok());
        assert!(check_duration("x", Duration::ZERO).is_ok());
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    #[test]
    fn server_config_with_a_zero_maintenance_interval_is_refused() {
        let mut config = ServerConfig::new("unused");
        assert!(check_server_config(&config).is_ok());
        config.store.maintenance_interval = Duration::ZERO;
        let err = check_server_config(&config).unwrap_err();
        assert!(err.to_string().contains("maintenance_interval"), "{err}");
        let mut config = ServerConfig::new("unused");
        config.store.dedup_window = Duration::MAX;
        assert!(check_server_config(&config).is_err());
    }
}
