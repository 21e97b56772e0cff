//! Message attributes where they are decoded from bytes: the broker's store
//! (length-prefixed names and values) and the outbox row that the relay
//! reads (JSON, which the application may write by hand). Whatever decodes
//! encodes back to the same; whatever encodes decodes back to the same; bad
//! input is an error of the right kind, never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use tidings::Error;
use tidings::fuzzing::{
    decode_outbox_attributes, decode_stored_attributes, encode_outbox_attributes,
    encode_stored_attributes,
};

fuzz_target!(|data: &[u8]| {
    // The bytes as a stored attributes column.
    match decode_stored_attributes(Some(data.to_vec())) {
        Ok(pairs) => {
            let again = encode_stored_attributes(&pairs).unwrap_or_default();
            assert_eq!(again, data, "decoded as {pairs:?}");
        }
        Err(Error::Storage(_)) => {}
        Err(e) => panic!("not a Storage error: {e:?}"),
    }

    // The bytes as an outbox row's attributes column.
    if let Ok(text) = std::str::from_utf8(data) {
        match decode_outbox_attributes(Some(text)) {
            Ok(map) => {
                let json = encode_outbox_attributes(&map);
                assert_eq!(
                    decode_outbox_attributes(Some(&json)).ok(),
                    Some(map),
                    "{text:?}"
                );
            }
            Err(Error::InvalidArgument(_)) => {}
            Err(e) => panic!("{text:?}: not an InvalidArgument: {e:?}"),
        }
    }

    // The bytes as attributes to write, in both encodings.
    let mut u = Unstructured::new(data);
    if let Ok(pairs) = Vec::<(String, String)>::arbitrary(&mut u) {
        let stored = encode_stored_attributes(&pairs);
        assert_eq!(stored.is_none(), pairs.is_empty());
        assert_eq!(decode_stored_attributes(stored).ok(), Some(pairs.clone()));

        let map: HashMap<String, String> = pairs.into_iter().collect();
        let json = encode_outbox_attributes(&map);
        assert_eq!(
            decode_outbox_attributes(Some(&json)).ok(),
            Some(map),
            "{json:?}"
        );
    }
});
