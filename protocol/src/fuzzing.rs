//! The property the `client_frame` fuzz target (fuzz/) checks, shared with a
//! unit test that replays the committed seed corpus on stable Rust.

use crate::frame::{ClientFrame, MAX_QUOTED_BYTES};

/// Longest error message, whatever the input: the quoted part (escaped, up
/// to 6 bytes per byte: Debug quoting writes \x7f as `\u{7f}`) plus fixed words.
const MAX_ERROR_BYTES: usize = 6 * MAX_QUOTED_BYTES + 128;

/// Feeds arbitrary bytes to the client-frame parser. Panics if the parser
/// panics, if a parsed frame does not survive re-encoding unchanged, or if an
/// error message (sent back to the client in an error frame) is unbounded.
pub fn client_frame(data: &[u8]) {
    // The gateway only ever parses text frames, which tungstenite has
    // already checked to be UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ClientFrame::parse(text) {
        Ok(frame) => {
            let encoded = frame.to_json();
            let again = ClientFrame::parse(&encoded)
                .unwrap_or_else(|err| panic!("re-encoded frame {encoded} does not parse: {err}"));
            assert_eq!(again.to_json(), encoded, "re-encoding changed the frame");
        }
        Err(err) => {
            let _ = err.code();
            let message = err.to_string();
            assert!(
                message.len() <= MAX_ERROR_BYTES,
                "error message of {} bytes for {} bytes of input",
                message.len(),
                text.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// Replays fuzz/corpus/client_frame (seeds and anything the fuzzer found
    /// and was committed) through the property.
    #[test]
    fn seed_corpus_holds_the_property() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/client_frame");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("the seed corpus is committed") {
            let path = entry.expect("entry").path();
            super::client_frame(&std::fs::read(&path).expect("read"));
            count += 1;
        }
        assert!(count >= 10, "only {count} seeds in {}", dir.display());
    }
}
