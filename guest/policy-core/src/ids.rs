//! The id allow-list, shared by every policy and re-checked by the host.
//!
//! - user id: 1..=64 of `[a-z0-9_]`, first character a letter or digit;
//! - thread id: `{user}` or `{user}-{rest}`, `rest` 1..=128 of `[A-Za-z0-9_-]`
//!   starting with a letter or digit;
//! - backend id: 1..=200 of `[A-Za-z0-9_-]`, first character a letter or digit.
//!
//! User ids become directory names on the host, so they are the strictest:
//! lowercase only (no `Alice` / `alice` pair that a case-insensitive
//! filesystem would merge), no `.` (no `..`), no `/`, `\`, NUL or whitespace.

use crate::host::{Error, Result};

pub const MAX_USER_LEN: usize = 64;
pub const MAX_THREAD_REST_LEN: usize = 128;
pub const MAX_BACKEND_LEN: usize = 200;

/// A thread id split into its user and the rest (if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadId<'a> {
    pub user: &'a str,
    pub rest: Option<&'a str>,
}

/// Parses `{user}-{rest}`: the user is the prefix before the first `-`.
pub fn parse_thread(thread_id: &str) -> Result<ThreadId<'_>> {
    let (user, rest) = match thread_id.split_once('-') {
        Some((user, rest)) => (user, Some(rest)),
        None => (thread_id, None),
    };
    check_user(user).map_err(|e| invalid(format!("thread id {}: {e}", shown(thread_id))))?;
    if let Some(rest) = rest {
        check_charset(rest, MAX_THREAD_REST_LEN, is_token_char)
            .and_then(|()| first_alnum(rest))
            .map_err(|e| {
                invalid(format!(
                    "thread id {}: part after the user {e}",
                    shown(thread_id)
                ))
            })?;
    }
    Ok(ThreadId { user, rest })
}

/// The user a backend belongs to: its id up to the first `-`. The host
/// requires every backend of a thread to belong to the thread's user, and a
/// backend's workspace to be that user's.
pub fn user_of_backend(backend_id: &str) -> &str {
    backend_id
        .split_once('-')
        .map_or(backend_id, |(user, _)| user)
}

/// Validates a user id.
pub fn validate_user(user_id: &str) -> Result<()> {
    check_user(user_id).map_err(|e| invalid(format!("user id {}: {e}", shown(user_id))))
}

/// Validates a backend id (the policy's choice, checked again by the host).
pub fn validate_backend(backend_id: &str) -> Result<()> {
    check_charset(backend_id, MAX_BACKEND_LEN, is_token_char)
        .and_then(|()| first_alnum(backend_id))
        .map_err(|e| invalid(format!("backend id {}: {e}", shown(backend_id))))
}

/// Validates a workspace name (same rules as a user id).
pub fn validate_workspace(name: &str) -> Result<()> {
    check_user(name).map_err(|e| invalid(format!("workspace name {}: {e}", shown(name))))
}

fn check_user(user: &str) -> std::result::Result<(), String> {
    check_charset(user, MAX_USER_LEN, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
    })?;
    first_alnum(user)
}

fn check_charset(
    s: &str,
    max_len: usize,
    allowed: impl Fn(char) -> bool,
) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max_len {
        return Err(format!("is {} bytes long, the limit is {max_len}", s.len()));
    }
    match s.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(format!(
            "contains the character {c:?}, which is not allowed"
        )),
        None => Ok(()),
    }
}

fn first_alnum(s: &str) -> std::result::Result<(), String> {
    match s.chars().next() {
        Some(c) if c.is_ascii_alphanumeric() => Ok(()),
        _ => Err("must start with a letter or a digit".into()),
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn invalid(message: String) -> Error {
    Error::InvalidId(message)
}

/// A bounded, escaped rendering of untrusted input for error messages, so a
/// 10 kB id or a control character cannot flood or forge log lines.
pub fn shown(s: &str) -> String {
    const MAX: usize = 48;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().count() > MAX {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_is_the_prefix_before_the_first_dash() {
        let t = parse_thread("alice-7f3a-99").unwrap();
        assert_eq!(t.user, "alice");
        assert_eq!(t.rest, Some("7f3a-99"));
        assert_eq!(parse_thread("bob").unwrap().rest, None);
    }

    #[test]
    fn hostile_thread_ids_are_rejected() {
        let long = "a".repeat(10_000);
        for id in [
            "",
            "-",
            "-x",
            "x-",
            "..-1",
            ".",
            "a/b-1",
            "a\\b-1",
            "a\0-1",
            "a\n-1",
            "a b-1",
            "Alice-1",
            "аlice-1", // Cyrillic a
            "%2e%2e-1",
            "a;rm -rf /",
            "a$(id)-1",
            "a`id`-1",
            "a|b",
            "alice-x/y",
            "alice-..",
            "alice-a b",
            "alice-\u{202e}",
            "_a-1",
            "x--",
            "alice--1",
            "alice-_",
            long.as_str(),
        ] {
            let err = parse_thread(id).unwrap_err();
            assert!(matches!(err, Error::InvalidId(_)), "{id:?} gave {err:?}");
        }
    }

    #[test]
    fn error_messages_are_bounded_and_escaped() {
        let err = parse_thread(&format!("a\n{}", "b".repeat(10_000))).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 200, "{text}");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn backend_ids_follow_their_own_rules() {
        assert!(validate_backend("alice-7F3a").is_ok());
        assert!(validate_backend("-alice").is_err());
        assert!(validate_backend("alice.x").is_err());
        assert!(validate_backend(&"a".repeat(201)).is_err());
    }
}
