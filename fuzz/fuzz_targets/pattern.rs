//! Name patterns of the access file (`orders.*`): the matcher agrees with a
//! plain dynamic-programming matcher on every pattern and name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::fuzzing::pattern_matches;

/// Whether `name` matches `pattern` (`*` is any run of bytes), by the
/// textbook table: `table[j]` says whether the pattern so far matches the
/// first `j` bytes of the name.
fn reference(pattern: &[u8], name: &[u8]) -> bool {
    let mut table = vec![false; name.len() + 1];
    table[0] = true;
    for &p in pattern {
        let mut next = vec![false; name.len() + 1];
        for j in 0..=name.len() {
            next[j] = if p == b'*' {
                table[j] || (j > 0 && next[j - 1])
            } else {
                j > 0 && table[j - 1] && name[j - 1] == p
            };
        }
        table = next;
    }
    table[name.len()]
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Pattern and name are split at the first newline.
    let (pattern, name) = text.split_once('\n').unwrap_or((text, ""));
    assert_eq!(
        pattern_matches(pattern, name),
        reference(pattern.as_bytes(), name.as_bytes()),
        "pattern {pattern:?}, name {name:?}"
    );
});
