//! Ack ids as clients send them back (`Ack`, `Nack`, `ModifyAckDeadline`,
//! the stream's acks). A string that parses prints back to a canonical form
//! that parses to the same id; an id the broker issues survives its text
//! form; anything else is an `InvalidArgument`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::Error;
use tidings::model::AckId;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match text.parse::<AckId>() {
            Ok(id) => {
                let printed = id.to_string();
                let again: AckId = printed.parse().expect("a printed ack id parses");
                assert_eq!(again, id, "{text:?} printed as {printed:?}");
                assert_eq!(again.to_string(), printed, "the printed form is canonical");
                // The text form has no sign, so ids read from text never
                // name a negative subscription or sequence.
                assert!(
                    id.subscription >= 0 && id.sequence >= 0,
                    "{text:?} gave {id:?}"
                );
            }
            Err(Error::InvalidArgument(_)) => {}
            Err(e) => panic!("{text:?}: not an InvalidArgument: {e:?}"),
        }
    }
    // The same bytes as an id the broker could issue: its subscription and
    // sequence are never negative, its token and deadline anything.
    if let Some((words, rest)) = data.split_first_chunk::<32>() {
        let word = |i: usize| i64::from_le_bytes(words[8 * i..8 * i + 8].try_into().unwrap());
        let id = AckId {
            subscription: word(0) & i64::MAX,
            sequence: word(1) & i64::MAX,
            token: word(2),
            deadline: rest.first().is_some_and(|b| b & 1 == 1).then(|| word(3)),
        };
        let printed = id.to_string();
        assert_eq!(printed.parse::<AckId>().ok(), Some(id), "{printed:?}");
    }
});
