//! The buckets a VM decoded last, each kept with the exact bytes it was decoded from.
//!
//! A warm token request reads four to seven buckets (its room's record and limit, the
//! requester's OpenID verdict, power levels for a refusal), most of them unchanged since this
//! VM last read them, and parsing their JSON was the largest part of a refusal's work. A
//! decoded bucket is reused only when the bytes read now are exactly those it was decoded
//! from, so the memo can never change what a read sees. A VM runs on one thread, so the memo
//! is thread-local; it is bounded: past [`CAPACITY`] buckets it starts afresh.

use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

use crate::state::memo::Memo;

/// Buckets kept per VM before the memo starts afresh (at most 32 KiB of bytes each); a
/// request reads at most seven.
pub const CAPACITY: usize = 32;

struct Decoded {
    bytes: Vec<u8>,
    value: Rc<dyn Any>,
}

thread_local! {
    static LAST: RefCell<Memo<Decoded>> = RefCell::new(Memo::bounded(CAPACITY));
}

/// `decode(&bytes)` of the bucket `key`, from the memo when this VM decoded these very bytes
/// of it last.
pub fn decoded<V: 'static>(key: &str, bytes: Vec<u8>, decode: impl FnOnce(&[u8]) -> V) -> Rc<V> {
    let hit = LAST.with(|last| {
        let last = last.try_borrow().ok()?;
        let kept = last.get(key).filter(|kept| kept.bytes == bytes)?;
        Rc::clone(&kept.value).downcast::<V>().ok()
    });
    if let Some(value) = hit {
        return value;
    }
    let value = Rc::new(decode(&bytes));
    keep(key, bytes, Rc::clone(&value) as Rc<dyn Any>);
    value
}

/// Keeps `value` as what `bytes`, just written to the bucket `key` by this VM, decode to: the
/// caller vouches that decoding them gives `value` back.
pub fn remember<V: 'static>(key: &str, bytes: Vec<u8>, value: V) {
    keep(key, bytes, Rc::new(value));
}

fn keep(key: &str, bytes: Vec<u8>, value: Rc<dyn Any>) {
    LAST.with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            last.keep(key, Decoded { bytes, value });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn length_of(key: &str, bytes: &[u8], decodes: &mut usize) -> usize {
        *decoded(key, bytes.to_vec(), |b| {
            *decodes += 1;
            b.len()
        })
    }

    #[test]
    fn the_same_bytes_decode_once_and_other_bytes_decode_again() {
        let mut decodes = 0;
        assert_eq!(length_of("memo.a", b"[1]", &mut decodes), 3);
        assert_eq!(length_of("memo.a", b"[1]", &mut decodes), 3);
        assert_eq!(decodes, 1, "unchanged bytes come from the memo");
        assert_eq!(length_of("memo.a", b"[1,2]", &mut decodes), 5);
        assert_eq!(decodes, 2, "changed bytes are decoded");
        assert_eq!(length_of("memo.b", b"[1,2]", &mut decodes), 5);
        assert_eq!(decodes, 3, "each bucket is its own");
    }

    #[test]
    fn a_bucket_read_as_another_type_is_decoded_afresh() {
        let first = decoded("memo.c", b"7".to_vec(), |b| b.len());
        let second = decoded("memo.c", b"7".to_vec(), |b| b.len() as u64 * 2);
        assert_eq!((*first, *second), (1, 2));
    }

    #[test]
    fn the_memo_stays_bounded() {
        let mut decodes = 0;
        for round in 0..2 {
            for i in 0..CAPACITY + 1 {
                length_of(&format!("memo.bound.{i}"), b"[]", &mut decodes);
            }
            assert!(
                LAST.with(|l| l.borrow().held()) <= CAPACITY,
                "round {round}"
            );
        }
    }
}
