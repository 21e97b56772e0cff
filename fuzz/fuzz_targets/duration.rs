//! Durations of the command line and the config (`30s`, `1.5h`, `7d`).
//! What parses is the number the text says, in the unit it names, never
//! more than the longest accepted and never anything else; every duration
//! up to that prints as text that parses back to exactly it; an interval is
//! never zero.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tidings::Error;
use tidings::config::{MAX_DURATION, format_duration, parse_duration, parse_interval};

/// What the text says in nanoseconds, roughly (f64), if it has the form of
/// a duration: digits with at most one point, then a known unit or none.
fn reference(text: &str) -> Option<f64> {
    let s = text.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = match unit {
        "" | "s" => 1e9,
        "ms" => 1e6,
        "us" | "µs" => 1e3,
        "m" => 60e9,
        "h" => 3600e9,
        "d" => 86400e9,
        _ => return None,
    };
    if number.matches('.').count() > 1 || !number.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let number = if number.ends_with('.') {
        &number[..number.len() - 1]
    } else {
        number
    };
    Some(number.parse::<f64>().ok()? * unit)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let max = MAX_DURATION.as_nanos() as f64;
        let parsed = parse_duration(text);
        match (&parsed, reference(text)) {
            (Ok(d), Some(nanos)) => {
                assert!(*d <= MAX_DURATION, "{text:?} gave {d:?}");
                // The parser keeps whole nanoseconds (cutting the rest);
                // f64 is off by a few parts in 1e16.
                let got = d.as_nanos() as f64;
                assert!(
                    (got - nanos).abs() <= 1.0 + nanos * 1e-14,
                    "{text:?} gave {d:?}, not about {nanos} ns"
                );
            }
            (Ok(d), None) => panic!("{text:?} is not a duration, yet gave {d:?}"),
            (Err(Error::InvalidArgument(_)), Some(nanos)) => assert!(
                nanos > max * (1.0 - 1e-14),
                "{text:?} ({nanos} ns) was refused"
            ),
            (Err(Error::InvalidArgument(_)), None) => {}
            (Err(e), _) => panic!("{text:?}: not an InvalidArgument: {e:?}"),
        }
        match parse_interval(text) {
            Ok(d) => {
                assert!(!d.is_zero());
                assert_eq!(parsed.ok(), Some(d));
            }
            Err(Error::InvalidArgument(_)) => {
                assert!(parsed.is_err() || parsed.is_ok_and(|d| d.is_zero()));
            }
            Err(e) => panic!("{text:?}: not an InvalidArgument: {e:?}"),
        }
    }
    // The bytes as a duration to print.
    if let Some(bytes) = data.first_chunk::<16>() {
        let nanos = u128::from_le_bytes(*bytes) % (MAX_DURATION.as_nanos() + 1);
        let d = Duration::new(
            (nanos / 1_000_000_000) as u64,
            (nanos % 1_000_000_000) as u32,
        );
        let text = format_duration(d);
        assert_eq!(
            parse_duration(&text).ok(),
            Some(d),
            "{d:?} printed as {text:?}"
        );
    }
});
