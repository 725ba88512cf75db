//! The id allow-list, as types that can only hold a valid id.
//!
//! - user id: 1..=64 of `[a-z0-9_]`, first character a letter or digit;
//! - thread id: `{user}` or `{user}-{rest}`, `rest` 1..=128 of `[A-Za-z0-9_-]`
//!   starting with a letter or digit;
//! - backend id: 1..=200 of `[A-Za-z0-9_-]`, first character a letter or
//!   digit; it belongs to the user named by its part before the first `-`.
//!
//! User ids become directory names on the host, so they are the strictest:
//! lowercase only (no `Alice` / `alice` pair that a case-insensitive
//! filesystem would merge), no `.` (no `..`), no `/`, `\`, NUL or whitespace.
//!
//! One formula, two entry points: a [`BackendId`] derives its container name
//! and its user, a [`WorkspaceName`] its path; nothing else builds them.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::types::{Error, Result};

/// Longest user id (and workspace name).
pub const MAX_USER_LEN: usize = 64;
/// Longest part of a thread id after the user.
pub const MAX_THREAD_REST_LEN: usize = 128;
/// Longest backend id.
pub const MAX_BACKEND_LEN: usize = 200;

/// A valid user id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(String);

/// A valid thread id, `{user}` or `{user}-{rest}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThreadId {
    id: String,
    user_len: usize,
}

/// A valid backend id: the policy's routing and cache key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(String);

/// A valid workspace name: a directory under the host's workspace root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkspaceName(String);

impl UserId {
    /// Checks `id` against the user id rules.
    pub fn parse(id: &str) -> Result<Self> {
        check_user(id).map_err(|e| invalid(format!("user id {}: {e} ({USER_RULE})", shown(id))))?;
        Ok(UserId(id.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The user's workspace: one per user, named after it.
    pub fn workspace(&self) -> WorkspaceName {
        WorkspaceName(self.0.clone())
    }
}

/// What a user id may be, said with every refusal.
const USER_RULE: &str = "a user id is 1-64 of a-z 0-9 _, starting with a letter or digit";
/// What a thread id may be, said with every refusal.
const THREAD_RULE: &str = "a thread id is USER or USER-REST: USER 1-64 of a-z 0-9 _, \
     REST 1-128 of A-Z a-z 0-9 _ -, each starting with a letter or digit";

impl ThreadId {
    /// Parses `{user}-{rest}`: the user is the prefix before the first `-`.
    pub fn parse(id: &str) -> Result<Self> {
        let (user, rest) = match id.split_once('-') {
            Some((user, rest)) => (user, Some(rest)),
            None => (id, None),
        };
        check_user(user)
            .map_err(|e| invalid(format!("thread id {}: {e} ({THREAD_RULE})", shown(id))))?;
        if let Some(rest) = rest {
            check_charset(rest, MAX_THREAD_REST_LEN, is_token_char)
                .and_then(|()| first_alnum(rest))
                .map_err(|e| {
                    invalid(format!(
                        "thread id {}: part after the user {e} ({THREAD_RULE})",
                        shown(id)
                    ))
                })?;
        }
        Ok(ThreadId {
            id: id.to_owned(),
            user_len: user.len(),
        })
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The user owning the thread.
    pub fn user(&self) -> UserId {
        UserId(self.id[..self.user_len].to_owned())
    }

    /// The part after `{user}-`, if any.
    pub fn rest(&self) -> Option<&str> {
        self.id.get(self.user_len + 1..)
    }
}

impl BackendId {
    /// Checks `id` against the backend id rules.
    pub fn parse(id: &str) -> Result<Self> {
        check_charset(id, MAX_BACKEND_LEN, is_token_char)
            .and_then(|()| first_alnum(id))
            .map_err(|e| invalid(format!("backend id {}: {e}", shown(id))))?;
        Ok(BackendId(id.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The user the backend belongs to: its id up to the first `-`, which
    /// must itself be a valid user id.
    pub fn user(&self) -> Result<UserId> {
        let prefix = self.0.split_once('-').map_or(self.0.as_str(), |(u, _)| u);
        UserId::parse(prefix)
            .map_err(|e| invalid(format!("backend id {} names no user: {e}", shown(&self.0))))
    }

    /// The container name of this backend in `namespace`:
    /// `sandbox.{namespace}.{backend-id}`. Neither part contains `.`, so two
    /// distinct (namespace, backend) pairs never share a name (with `-` as
    /// separator, `a-b` + `c` and `a` + `b-c` would).
    pub fn container_name(&self, namespace: &str) -> String {
        format!("sandbox.{namespace}.{}", self.0)
    }
}

impl WorkspaceName {
    /// Checks `name` against the workspace rules (those of a user id).
    pub fn parse(name: &str) -> Result<Self> {
        check_user(name).map_err(|e| invalid(format!("workspace name {}: {e}", shown(name))))?;
        Ok(WorkspaceName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `{root}/{name}`: one path component that cannot climb out of `root`.
    pub fn path(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    )*};
}
display_as_str!(UserId, ThreadId, BackendId, WorkspaceName);

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
    fn the_user_is_the_prefix_before_the_first_dash() {
        let t = ThreadId::parse("alice-7f3a-99").unwrap();
        assert_eq!(t.user().as_str(), "alice");
        assert_eq!(t.rest(), Some("7f3a-99"));
        assert_eq!(ThreadId::parse("bob").unwrap().rest(), None);
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
            let err = ThreadId::parse(id).unwrap_err();
            assert!(matches!(err, Error::InvalidId(_)), "{id:?} gave {err:?}");
        }
    }

    #[test]
    fn a_refusal_says_what_is_allowed() {
        let err = ThreadId::parse("Alice-1").unwrap_err().to_string();
        assert!(
            err.contains("'A'") && err.contains("a thread id is USER or USER-REST"),
            "{err}"
        );
        let err = UserId::parse("bob smith").unwrap_err().to_string();
        assert!(err.contains("a user id is 1-64 of a-z 0-9 _"), "{err}");
    }

    #[test]
    fn error_messages_are_bounded_and_escaped() {
        let err = ThreadId::parse(&format!("a\n{}", "b".repeat(10_000))).unwrap_err();
        let text = err.to_string();
        assert!(text.len() < 400, "{text}");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn backend_ids_follow_their_own_rules_and_name_their_user() {
        assert!(BackendId::parse("alice-7F3a").is_ok());
        assert!(BackendId::parse("-alice").is_err());
        assert!(BackendId::parse("alice.x").is_err());
        assert!(BackendId::parse(&"a".repeat(201)).is_err());
        let b = BackendId::parse("alice-7F3a").unwrap();
        assert_eq!(b.user().unwrap().as_str(), "alice");
        // A valid backend id whose prefix is no user id belongs to nobody.
        assert!(BackendId::parse("Alice-1").unwrap().user().is_err());
    }

    #[test]
    fn dash_in_namespace_and_backend_cannot_collide() {
        let a = BackendId::parse("c").unwrap().container_name("a-b");
        let b = BackendId::parse("b-c").unwrap().container_name("a");
        assert_ne!(a, b);
    }

    #[test]
    fn a_workspace_path_is_one_component_under_the_root() {
        let root = Path::new("/srv/ws");
        let ws = UserId::parse("alice").unwrap().workspace();
        assert_eq!(ws.path(root), Path::new("/srv/ws/alice"));
        for bad in ["..", "a/b", "/etc", "A", ""] {
            assert!(WorkspaceName::parse(bad).is_err(), "{bad}");
        }
    }
}
