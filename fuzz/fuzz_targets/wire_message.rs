//! Messages off the wire: a publish request's message as the server
//! converts it, and a delivery as the client converts it. A message that
//! converts keeps exactly its attributes (sorted by name) and converts back
//! to the same; one that does not is an `InvalidArgument`, never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tidings::Error;
use tidings::model::{Delivery, NewMessage, StoredMessage};
use tidings::proto;

/// The same message after a trip through its wire form and back.
fn through_the_wire<D, P>(value: D) -> Result<D, Error>
where
    D: Into<P> + TryFrom<P, Error = Error>,
    P: prost::Message + Default,
{
    let bytes = value.into().encode_to_vec();
    D::try_from(P::decode(bytes.as_slice()).expect("an encoded message decodes"))
}

fn check_attributes(sent: &HashMap<String, String>, got: &[(String, String)]) {
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "not sorted: {got:?}"
    );
    let got: HashMap<String, String> = got.iter().cloned().collect();
    assert_eq!(&got, sent);
}

fn refused<T: std::fmt::Debug>(result: &Result<T, Error>) {
    if let Err(e) = result {
        assert!(
            matches!(e, Error::InvalidArgument(_)),
            "not an InvalidArgument: {e:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = proto::Message::decode(data) {
        // As the server reads a message to publish.
        let new = NewMessage::try_from(m.clone());
        refused(&new);
        if let Ok(new) = new {
            check_attributes(&m.attributes, &new.attributes);
            assert_eq!(new.id.to_string().parse().ok(), Some(new.id));
            tidings::model::validate_name("topic", &new.topic).expect("a converted topic is valid");
            assert_eq!(
                through_the_wire::<_, proto::Message>(new.clone()).ok(),
                Some(new)
            );
        }
        // As a client reads a message delivered or peeked.
        let stored = StoredMessage::try_from(m.clone());
        refused(&stored);
        if let Ok(stored) = stored {
            check_attributes(&m.attributes, &stored.attributes);
            assert_eq!(
                through_the_wire::<_, proto::Message>(stored.clone()).ok(),
                Some(stored)
            );
        }
    }
    if let Ok(r) = proto::ReceivedMessage::decode(data) {
        let delivery = Delivery::try_from(r);
        refused(&delivery);
        if let Ok(d) = delivery {
            assert_eq!(
                through_the_wire::<_, proto::ReceivedMessage>(d.clone()).ok(),
                Some(d)
            );
        }
    }
});
