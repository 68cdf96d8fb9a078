//! Arbitrary bytes as every request body, query string, chat id and Authorization header:
//! each decoder accepts values within the limits or names the problem with a 4xx; none panics.

#![no_main]
use libfuzzer_sys::fuzz_target;
use parley::config::LimitsSection;
use parley::server::{ApiError, input};

fn refused(e: &ApiError) {
    assert!(e.status().is_client_error(), "{} {}", e.status(), e.code());
    assert!(!e.code().is_empty() && !e.message().is_empty());
}

fuzz_target!(|data: &[u8]| {
    let limits = LimitsSection::default();
    let nickname_ok = |n: &str| !n.is_empty() && n == n.trim() && n.chars().count() <= limits.max_nickname_chars;
    match input::new_chat(data, &limits) {
        Ok(c) => assert!(nickname_ok(&c.nickname) && c.subject.chars().count() <= limits.max_message_chars && c.client_request_id.as_ref().is_none_or(|id| (16..=128).contains(&id.len()))),
        Err(e) => refused(&e),
    }
    match input::new_message(data, &limits) {
        Ok(m) => {
            assert!(!m.text.trim().is_empty() && m.text.chars().count() <= limits.max_message_chars);
            assert!(m.client_msg_id.as_ref().is_none_or(|id| (1..=128).contains(&id.len())));
        }
        Err(e) => refused(&e),
    }
    if let Err(e) = input::typing(data) {
        refused(&e);
    }
    let request_id_ok = |id: &Option<String>| id.as_ref().is_none_or(|id| (16..=128).contains(&id.len()));
    match input::join(data, &limits) {
        Ok(j) => assert!(nickname_ok(&j.nickname) && request_id_ok(&j.client_request_id)),
        Err(e) => refused(&e),
    }
    match input::close_reason(data, &limits) {
        Ok(r) => assert!(r.is_none_or(|r| r.chars().count() <= limits.max_message_chars)),
        Err(e) => refused(&e),
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let pairs = input::query_pairs(text);
    assert!(pairs.iter().all(|(k, v)| !k.contains('&') && !v.contains('&')));
    for name in ["after", "wait_ms"] {
        match input::query_u64(text, name, 7) {
            Ok(v) => assert!(pairs.iter().any(|(k, _)| k == name) || v == 7),
            Err(e) => refused(&e),
        }
    }
    match input::chat_id(text) {
        Ok(()) => assert!(text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
        Err(e) => assert_eq!(e.status().as_u16(), 404),
    }
    if let Some(token) = input::bearer(text) {
        assert!(text.starts_with("Bearer ") && !token.is_empty() && token == token.trim());
    }
});
