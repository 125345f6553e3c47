//! The key path of a position in a JSON document (`synapse.cluster`, `token_paths[1]`), so
//! that a configuration error names the key where serde_json stopped.
//!
//! serde_json reports where an error happened as a line and column; this walks the document
//! up to that point. Tracking the path while deserialising instead (as `serde_path_to_error`
//! does) wraps every deserializer and visitor of the configuration in generic adapters: about
//! 11 KB of the module's code after wasm-opt, which V8 compiles whenever a VM starts. Walking
//! the text costs one small function, and runs only when a configuration is refused.

/// Where in its container the walk is.
enum Frame {
    /// In an object: the key just read, if any, and whether the next string is a key.
    Object {
        key: Option<String>,
        expect_key: bool,
    },
    Array {
        index: usize,
    },
}

/// The path to the value being read when `offset` bytes of `json` had been consumed: the
/// keys and indexes of the containers open at that point, joined as `a.b[2].c`; `.` for the
/// document itself. A key just read counts as part of the path (its value is being read),
/// unless `parent` is set: errors about an object as a whole (a duplicate key) name the
/// object. Right after a container closes, the path is that container's (its parent's key).
pub fn key_path_at(json: &[u8], offset: usize, parent: bool) -> String {
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < offset.min(json.len()) {
        match json[i] {
            b'{' => stack.push(Frame::Object {
                key: None,
                expect_key: true,
            }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { key, expect_key }) => {
                    *key = None;
                    *expect_key = true;
                }
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            b'"' => {
                let end = string_end(json, i);
                if let Some(Frame::Object { key, expect_key }) = stack.last_mut() {
                    if *expect_key {
                        *key = Some(unquote(&json[i..end]));
                        *expect_key = false;
                    }
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if parent {
        if let Some(Frame::Object { key, .. }) = stack.last_mut() {
            *key = None;
        }
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(key), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Object { key: None, .. } => {}
            Frame::Array { index } => path.push_str(&format!("[{index}]")),
        }
    }
    if path.is_empty() {
        path.push('.');
    }
    path
}

/// The index just past the string that starts at `start` (a `"`), or the end of the input.
fn string_end(json: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    json.len()
}

/// A key as written between its quotes (escapes are left as they are: keys have none).
fn unquote(quoted: &[u8]) -> String {
    let text = quoted.strip_prefix(b"\"").unwrap_or(quoted);
    let text = text.strip_suffix(b"\"").unwrap_or(text);
    String::from_utf8_lossy(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path at the end of `before`, the document read up to the error.
    fn path(before: &str) -> String {
        key_path_at(before.as_bytes(), before.len(), false)
    }

    #[test]
    fn names_keys_and_indexes_open_at_the_position() {
        assert_eq!(path(r#"{"a": 1"#), "a");
        assert_eq!(path(r#"{"a": 1, "b""#), "b");
        assert_eq!(
            path(r#"{"synapse": {"cluster": "s", "timeout""#),
            "synapse.timeout"
        );
        assert_eq!(path(r#"{"token_paths": ["/a", 1"#), "token_paths[1]");
        assert_eq!(path(r#"{"a": [[1], {"b": [2, 3"#), "a[1].b[1]");
        assert_eq!(path(r#"{"a": {"b": 1}, "c": 2"#), "c");
        assert_eq!(path("{"), ".");
        assert_eq!(path(""), ".");
    }

    #[test]
    fn strings_with_brackets_commas_and_escapes_are_read_as_strings() {
        assert_eq!(path(r#"{"a": "x,}]{[\"", "b": 1"#), "b");
        assert_eq!(path(r#"{"a\"b": 1"#), r#"a\"b"#);
        assert_eq!(path(r#"{"bo\u0067us""#), r#"bo\u0067us"#);
        assert_eq!(path(r#"{"a": ["x\\", 2"#), "a[1]");
    }

    #[test]
    fn a_container_just_closed_is_the_path() {
        assert_eq!(path(r#"{"synapse": {"cluster": "s"}"#), "synapse");
        assert_eq!(path(r#"{"a": 1}"#), ".");
    }

    #[test]
    fn errors_about_an_object_name_the_object() {
        let json = r#"{"synapse": {"cluster": "s", "cluster""#;
        assert_eq!(key_path_at(json.as_bytes(), json.len(), true), "synapse");
        let json = r#"{"failure_mode": "open", "failure_mode""#;
        assert_eq!(key_path_at(json.as_bytes(), json.len(), true), ".");
    }

    #[test]
    fn offsets_past_the_end_and_unterminated_strings_are_safe() {
        assert_eq!(key_path_at(br#"{"a": 1"#, 100, false), "a");
        assert_eq!(path(r#"{"a": "unterminated"#), "a");
        assert_eq!(path(r#"{"a\"#), r#"a\"#);
    }
}
