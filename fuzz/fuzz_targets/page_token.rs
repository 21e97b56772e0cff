//! Page tokens of `ListTopics`, `ListSubscriptions` and `Peek`, which
//! clients hand back. A token decodes only to what the server could have
//! encoded into exactly that token; anything else is an `InvalidArgument`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::Error;
use tidings::fuzzing::{decode_page_token, encode_page_token};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_page_token(text) {
        Ok(None) => assert!(text.is_empty(), "{text:?} read as the first page"),
        Ok(Some(last)) => {
            assert!(
                (1..=255).contains(&last.len()),
                "{text:?} gave a {}-byte name",
                last.len()
            );
            // Hex is read in either case, but nothing else: a token that
            // decodes is the encoding of what it decodes to.
            assert_eq!(
                encode_page_token(&last),
                text.to_ascii_lowercase(),
                "{text:?}"
            );
        }
        Err(Error::InvalidArgument(_)) => {}
        Err(e) => panic!("{text:?}: not an InvalidArgument: {e:?}"),
    }
    // The same text as the last name of a page.
    if (1..=255).contains(&text.len()) {
        let token = encode_page_token(text);
        assert_eq!(
            decode_page_token(&token).ok(),
            Some(Some(text.to_owned())),
            "{token:?}"
        );
    }
});
