//! JSON objects read with serde_json: the answers of Synapse and LiveKit and the claims of
//! issued tokens. (The token request body is read by [`crate::gojson`] instead: it must be
//! read exactly as lk-jwt-service's Go decoder reads it.)

use serde::de::DeserializeOwned;

/// `bytes` as a `T` when they are one JSON object. serde would also read a struct from a
/// JSON array (its fields in order); none of the documents read here is one.
pub fn object<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Pair {
        a: u8,
        b: u8,
    }

    #[test]
    fn only_objects_are_read() {
        assert_eq!(object(br#" {"a":1,"b":2}"#), Some(Pair { a: 1, b: 2 }));
        assert_eq!(object::<Pair>(b"[1,2]"), None);
        assert_eq!(object::<Pair>(br#"{"a":1}"#), None);
        assert_eq!(object::<Pair>(b""), None);
    }
}
