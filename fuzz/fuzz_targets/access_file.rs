//! The access file (`--access-file`, JSON). A file that is read says what
//! its text says, read independently here: the principals in order with
//! their names, rights, token hashes and certificate names, none listed
//! twice. A file that is refused is an `InvalidArgument`, never a panic.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tidings::Error;
use tidings::fuzzing::read_access_file;

fn strings(p: &Value, field: &str) -> Vec<String> {
    p.get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn hash(token: &str) -> [u8; 32] {
    let hex = token.strip_prefix("sha256:").expect("sha256: prefix");
    assert_eq!(hex.len(), 64, "{token:?}");
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        let digits = &hex[2 * i..2 * i + 2];
        assert!(digits.bytes().all(|c| c.is_ascii_hexdigit()), "{token:?}");
        *b = u8::from_str_radix(digits, 16).unwrap();
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let principals = match read_access_file(text) {
        Ok(p) => p,
        Err(Error::InvalidArgument(_)) => return,
        Err(e) => panic!("{text:?}: not an InvalidArgument: {e:?}"),
    };
    let value: Value = serde_json::from_str(text).expect("a file that was read is JSON");
    let listed = value["principals"].as_array().expect("a principals list");
    assert_eq!(listed.len(), principals.len());
    let mut names = BTreeSet::new();
    let mut all_tokens = BTreeSet::new();
    let mut all_certificates = BTreeSet::new();
    for (p, read) in listed.iter().zip(&principals) {
        assert_eq!(p["name"].as_str(), Some(read.name.as_str()));
        assert!(names.insert(read.name.clone()), "{:?} twice", read.name);
        assert_eq!(
            p.get("admin").and_then(Value::as_bool).unwrap_or(false),
            read.admin
        );
        assert_eq!(strings(p, "publish"), read.publish);
        assert_eq!(strings(p, "consume"), read.consume);
        let tokens: BTreeSet<[u8; 32]> = strings(p, "tokens").iter().map(|t| hash(t)).collect();
        assert_eq!(tokens.iter().copied().collect::<Vec<_>>(), read.tokens);
        assert_eq!(tokens.len(), strings(p, "tokens").len(), "a token twice");
        let certificates: BTreeSet<String> = strings(p, "certificates")
            .iter()
            .map(|c| c.to_ascii_lowercase())
            .collect();
        assert_eq!(
            certificates.iter().cloned().collect::<Vec<_>>(),
            read.certificates
        );
        for t in tokens {
            assert!(all_tokens.insert(t), "a token of two principals");
        }
        for c in certificates {
            assert!(
                all_certificates.insert(c),
                "a certificate name of two principals"
            );
        }
    }
});
