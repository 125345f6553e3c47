//! Records written compactly: a struct as the JSON array of its fields, so that a shared
//! record costs a few dozen bytes per entry instead of its field names.

/// Serialises a struct as the array of its fields, in declaration order.
macro_rules! as_array {
    ($type:ty { $($field:ident),+ }) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeTuple;
                let mut tuple = serializer.serialize_tuple([$(stringify!($field)),+].len())?;
                $(tuple.serialize_element(&self.$field)?;)+
                tuple.end()
            }
        }
    };
}
pub(crate) use as_array;
