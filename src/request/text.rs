//! Untrusted text as the guard may show it.

/// Untrusted text (room ids, user ids, reasons quoting them) as it may appear in a log line:
/// cut to a fixed length, so a client cannot write megabytes into the proxy's log.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    const MAX_CHARS: usize = 128;
    match text.char_indices().nth(MAX_CHARS) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => {
            std::borrow::Cow::Owned(format!("{}... ({} bytes)", &text[..end], text.len()))
        }
    }
}
