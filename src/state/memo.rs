//! The names the guard derives from ids by hashing, remembered per VM.
//!
//! Every token request for a call names its room several times over (the bucket digest and
//! the bucket of each kind of state, the LiveKit room alias), each a SHA-256 of a short
//! string; in a Wasm VM those hashes were the largest part of a warm request's work. A VM runs
//! on one thread, so a thread-local map spares them for the ids it saw last. It is bounded:
//! past [`CAPACITY`] names it starts afresh, so a client spraying new ids costs what it would
//! cost without the memo, and no more memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::thread::LocalKey;

/// Names kept per memo before it starts afresh.
pub const CAPACITY: usize = 512;

/// One kind of derived name, by the text it was derived from.
pub struct Memo<V> {
    names: HashMap<String, V>,
    capacity: usize,
}

impl<V> Default for Memo<V> {
    fn default() -> Self {
        Memo::bounded(CAPACITY)
    }
}

impl<V> Memo<V> {
    /// A memo that starts afresh past `capacity` names.
    pub fn bounded(capacity: usize) -> Self {
        Memo {
            names: HashMap::new(),
            capacity,
        }
    }

    /// What is kept for `text`, if anything.
    pub fn get(&self, text: &str) -> Option<&V> {
        self.names.get(text)
    }

    /// Keeps `value` for `text`, starting afresh first when the memo is full.
    pub fn keep(&mut self, text: &str, value: V) {
        if self.names.len() >= self.capacity && !self.names.contains_key(text) {
            self.names.clear();
        }
        self.names.insert(text.to_owned(), value);
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.names.len()
    }
}

impl<V: Clone> Memo<V> {
    fn name(&mut self, text: &str, derive: impl FnOnce(&str) -> V) -> V {
        if let Some(name) = self.get(text) {
            return name.clone();
        }
        let name = derive(text);
        self.keep(text, name.clone());
        name
    }
}

/// `derive(text)`, from `memo` when this thread derived it lately.
pub fn named<V: Clone + 'static>(
    memo: &'static LocalKey<RefCell<Memo<V>>>,
    text: &str,
    derive: impl FnOnce(&str) -> V,
) -> V {
    memo.with(|memo| match memo.try_borrow_mut() {
        Ok(mut memo) => memo.name(text, derive),
        // Only a `derive` that itself asks this memo gets here: derive without it.
        Err(_) => derive(text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    thread_local! {
        static LENGTHS: RefCell<Memo<usize>> = RefCell::new(Memo::default());
    }

    #[test]
    fn derives_each_name_once_and_stays_bounded() {
        let mut derived = 0;
        for round in 0..3 {
            for i in 0..CAPACITY {
                let text = format!("!room{i}:example.com");
                let name = named(&LENGTHS, &text, |t| {
                    derived += 1;
                    t.len()
                });
                assert_eq!(name, text.len(), "round {round}");
            }
        }
        assert_eq!(derived, CAPACITY, "asked again, a name comes from the memo");
        // One more id starts the memo afresh rather than growing it.
        named(&LENGTHS, "!one-more:example.com", |t| t.len());
        LENGTHS.with(|memo| assert_eq!(memo.borrow().held(), 1));
    }
}
