//! JSON objects read with serde_json: the answers of Synapse and LiveKit and the claims of
//! issued tokens. (The token request body is read by [`crate::request::gojson`] instead: it must be
//! read exactly as lk-jwt-service's Go decoder reads it.)

use std::fmt;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// `bytes` as a `T` when they are one JSON object. serde would also read a struct from a
/// JSON array (its fields in order); none of the documents read here is one.
pub fn object<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    if first_byte(bytes) != Some(b'{') {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// The first byte of a JSON document that is not whitespace: `{` for an object.
pub fn first_byte(bytes: &[u8]) -> Option<u8> {
    bytes.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// A JSON value of any type, of which only a number or a string is kept: for fields that
/// must never make a whole document unreadable because of their type (arrays and objects are
/// skipped without being copied). Much smaller in the module than `serde_json::Value`.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Scalar {
    Unsigned(u64),
    Negative,
    Float(f64),
    Text(String),
    /// Anything else, or absent.
    #[default]
    Other,
}

impl Scalar {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Text(text) => Some(text),
            _ => None,
        }
    }

    /// A number with a whole, non-negative value (`3`, `3.0`, `1e12`; floats past `u64`
    /// saturate).
    pub fn as_whole_number(&self) -> Option<u64> {
        match self {
            Scalar::Unsigned(n) => Some(*n),
            Scalar::Float(f) if *f >= 0.0 && f.fract() == 0.0 => Some(*f as u64),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Scalar, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar, E> {
                Ok(Scalar::Unsigned(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar, E> {
                Ok(u64::try_from(n).map_or(Scalar::Negative, Scalar::Unsigned))
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(f))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Scalar, E> {
                Ok(Scalar::Text(text))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// A type read from a JSON object, and read as its default from any other JSON value (a
/// malformed part of an event must not make the whole answer unreadable).
pub trait FromObject: Default {
    fn from_object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

struct Lenient<T>(std::marker::PhantomData<T>);

impl<'de, T: FromObject> Visitor<'de> for Lenient<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_object(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(T::default())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }
}

/// Reads a [`FromObject`] type from any JSON value.
pub fn lenient<'de, D: Deserializer<'de>, T: FromObject>(deserializer: D) -> Result<T, D::Error> {
    deserializer.deserialize_any(Lenient(std::marker::PhantomData))
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
    fn scalars_keep_numbers_and_text_and_skip_the_rest() {
        let read = |json: &str| serde_json::from_str::<Scalar>(json).unwrap();
        assert_eq!(read("3"), Scalar::Unsigned(3));
        assert_eq!(read("-3"), Scalar::Negative);
        assert_eq!(read("2.5"), Scalar::Float(2.5));
        assert_eq!(read(r#""x""#), Scalar::Text("x".into()));
        for other in ["null", "true", "[1,[2]]", r#"{"a":{"b":1}}"#] {
            assert_eq!(read(other), Scalar::Other, "{other}");
        }
        assert_eq!(read("1e12").as_whole_number(), Some(1_000_000_000_000));
        assert_eq!(read("3.0").as_whole_number(), Some(3));
        assert_eq!(read("2.5").as_whole_number(), None);
        assert_eq!(read("-1").as_whole_number(), None);
    }

    #[test]
    fn only_objects_are_read() {
        assert_eq!(object(br#" {"a":1,"b":2}"#), Some(Pair { a: 1, b: 2 }));
        assert_eq!(object::<Pair>(b"[1,2]"), None);
        assert_eq!(object::<Pair>(br#"{"a":1}"#), None);
        assert_eq!(object::<Pair>(b""), None);
    }
}
