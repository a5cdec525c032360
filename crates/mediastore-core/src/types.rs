//! The vocabulary shared by every layer: refs, policies, metadata, file
//! identity and time.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::Error;

/// The scheme every ref starts with.
pub const REF_PREFIX: &str = "media://";

/// Longest scope name accepted, in bytes. Scopes travel in URLs and logs, so a
/// bound keeps a hostile caller from making every log line a megabyte.
pub const MAX_SCOPE_LEN: usize = 512;

/// An opaque handle to one registration of a file: `media://<uuid v4>`.
///
/// Only the canonical spelling is accepted (lowercase, hyphenated, version 4,
/// RFC 4122 variant), so one ref has exactly one text form and a ref read from
/// a prompt can be compared byte for byte.
///
/// ```
/// use mediastore_core::MediaRef;
/// let r: MediaRef = "media://0f8fad5b-d9cb-469f-a165-70867728950e".parse()?;
/// assert_eq!(r.to_string(), "media://0f8fad5b-d9cb-469f-a165-70867728950e");
/// assert!("media://not-a-uuid".parse::<MediaRef>().is_err());
/// # Ok::<(), mediastore_core::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MediaRef(Uuid);

impl MediaRef {
    /// Wraps a UUID. Returns an error unless it is a version 4, RFC 4122 UUID.
    pub fn from_uuid(id: Uuid) -> Result<Self, Error> {
        if id.get_version_num() != 4 || id.get_variant() != uuid::Variant::RFC4122 {
            return Err(Error::InvalidRef {
                input: id.to_string(),
                reason: "not a version 4 UUID",
            });
        }
        Ok(Self(id))
    }

    /// Builds a ref from 128 random bits, forcing the version and variant
    /// bits. The caller supplies the randomness so the core stays free of I/O.
    pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Builder::from_random_bytes(bytes).into_uuid())
    }

    /// Parses either `media://<uuid>` or the bare UUID (as used in URL paths).
    pub fn parse_lenient(input: &str) -> Result<Self, Error> {
        match input.strip_prefix(REF_PREFIX) {
            Some(_) => input.parse(),
            None => parse_uuid(input, input),
        }
    }

    /// The UUID inside the ref.
    pub fn uuid(&self) -> Uuid {
        self.0
    }

    /// The ref as a 128-bit number; the core's key.
    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }
}

fn parse_uuid(text: &str, input: &str) -> Result<MediaRef, Error> {
    let bad = |reason| Error::InvalidRef {
        input: truncate_for_display(input),
        reason,
    };
    // Uuid::parse_str accepts braces, urn: and simple forms; only the
    // hyphenated lowercase form is canonical here.
    if text.len() != 36 {
        return Err(bad("expected 36 characters of hyphenated UUID"));
    }
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("UUID must be lowercase"));
    }
    let id = Uuid::try_parse(text).map_err(|_| bad("not a hyphenated UUID"))?;
    MediaRef::from_uuid(id).map_err(|_| bad("not a version 4 UUID"))
}

/// Keeps error messages bounded when a caller sends a huge or binary "ref".
pub(crate) fn truncate_for_display(input: &str) -> String {
    const MAX: usize = 80;
    if input.len() <= MAX {
        return input.to_owned();
    }
    let mut end = MAX;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &input[..end])
}

impl FromStr for MediaRef {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        match input.strip_prefix(REF_PREFIX) {
            Some(rest) => parse_uuid(rest, input),
            None => Err(Error::InvalidRef {
                input: truncate_for_display(input),
                reason: "missing media:// prefix",
            }),
        }
    }
}

impl fmt::Display for MediaRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{REF_PREFIX}{}", self.0.hyphenated())
    }
}

impl fmt::Debug for MediaRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MediaRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MediaRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What happens to the file when its last ref goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupPolicy {
    /// The store owns the file and deletes it once its last ref is gone.
    DeleteOnCleanup,
    /// A borrowed file: only the mapping is dropped, the file is never deleted.
    /// One such ref pins the file for as long as it has refs.
    ForgetOnly,
}

impl CleanupPolicy {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeleteOnCleanup => "delete_on_cleanup",
            Self::ForgetOnly => "forget_only",
        }
    }
}

impl FromStr for CleanupPolicy {
    type Err = Error;

    /// Unknown strings are an error, never a silent "delete" (the seed's
    /// fallback turned typos into data loss).
    fn from_str(input: &str) -> Result<Self, Error> {
        match input {
            "delete_on_cleanup" => Ok(Self::DeleteOnCleanup),
            "forget_only" => Ok(Self::ForgetOnly),
            _ => Err(Error::InvalidPolicy {
                input: truncate_for_display(input),
            }),
        }
    }
}

impl fmt::Display for CleanupPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Metadata recorded with a ref.
///
/// `policy: None` asks the engine to decide by location: a file under an owned
/// root (or written by the store) is `DeleteOnCleanup`, anything else
/// `ForgetOnly`. Metadata returned by a resolve always carries the policy that
/// was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MediaMeta {
    /// The name to show a user; never used as a path.
    pub filename: String,
    /// MIME type, e.g. `image/jpeg`.
    pub content_type: String,
    /// Where the media came from: `telegram`, `tool:tts`, …
    pub source: String,
    /// Cleanup policy; `None` means "by location".
    pub policy: Option<CleanupPolicy>,
}

impl MediaMeta {
    /// Metadata with the policy left to the engine.
    pub fn new(
        filename: impl Into<String>,
        content_type: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        Self {
            filename: filename.into(),
            content_type: content_type.into(),
            source: source.into(),
            policy: None,
        }
    }

    /// Sets the cleanup policy explicitly.
    pub fn with_policy(mut self, policy: CleanupPolicy) -> Self {
        self.policy = Some(policy);
        self
    }
}

/// Identity of a file: device, inode and birth time. Two spellings of one
/// file (`./`, `..`, symlinks, hard links) have the same key, so they share a
/// count. The birth time tells a file from a later one that reuses its inode
/// number after it was deleted and re-created behind the store's back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileKey {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Birth time in nanoseconds since the epoch, 0 where the filesystem
    /// does not record one.
    pub born: u64,
}

/// A point in time: nanoseconds since the Unix epoch. The core never reads a
/// clock; every operation that depends on time takes one of these.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Converts a wall-clock time; times before 1970 clamp to the epoch.
    pub fn from_system(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Back to wall-clock time.
    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.0)
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(duration_nanos(d)))
    }
}

pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How long the holds of a scope live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    /// Use the scope rules, then the store's default max age.
    #[default]
    Default,
    /// Holds of this scope never expire; only a release drops them.
    Never,
    /// Holds expire once strictly older than this (since made or renewed).
    After(Duration),
}

/// Sets the expiry of every scope whose name starts with `prefix`
/// (longest prefix wins), e.g. `session:` → 7 days, `telegram:` → 30 minutes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeRule {
    /// Scope name prefix.
    pub prefix: String,
    /// Expiry applied to matching scopes; `Expiry::Default` falls through to
    /// the store default.
    pub expiry: Expiry,
}

fn has_control(s: &str) -> bool {
    // One pass without early exit (it vectorises): any byte outside
    // printable ASCII sends the scope to the exact, per-char check.
    let unusual = s
        .bytes()
        .fold(false, |acc, b| acc | (b.wrapping_sub(0x20) >= 0x5f));
    unusual && s.chars().any(char::is_control)
}

/// Checks a scope name: non-empty, at most [`MAX_SCOPE_LEN`] bytes, and no
/// control characters (they break logs and headers).
pub fn validate_scope(scope: &str) -> Result<(), Error> {
    let reason = if scope.is_empty() {
        "scope is empty"
    } else if scope.len() > MAX_SCOPE_LEN {
        "scope is longer than 512 bytes"
    } else if has_control(scope) {
        "scope contains a control character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidScope {
        scope: truncate_for_display(scope).escape_debug().to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_round_trips_and_rejects_other_spellings() {
        let r = MediaRef::from_random_bytes([7; 16]);
        let text = r.to_string();
        assert!(text.starts_with("media://"));
        assert_eq!(text.parse::<MediaRef>().unwrap(), r);
        assert_eq!(MediaRef::parse_lenient(&text[8..]).unwrap(), r);
        for bad in [
            "",
            "media://",
            text.to_uppercase().as_str(),
            &text.replace("media://", "media:/"),
            &text.replace("media://", "file://"),
            &format!("{text}x"),
            &text.replace('-', ""),
            &format!("media://{{{}}}", &text[8..]),
            // version 1
            "media://0f8fad5b-d9cb-169f-a165-70867728950e",
            // wrong variant
            "media://0f8fad5b-d9cb-469f-c165-70867728950e",
            "media://../../etc/passwd",
        ] {
            let err = bad.parse::<MediaRef>().unwrap_err();
            assert!(matches!(err, Error::InvalidRef { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn invalid_ref_message_is_bounded() {
        let huge = format!("media://{}", "é".repeat(10_000));
        let msg = huge.parse::<MediaRef>().unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn policy_strings_are_strict() {
        assert_eq!(
            "delete_on_cleanup".parse::<CleanupPolicy>().unwrap(),
            CleanupPolicy::DeleteOnCleanup
        );
        assert_eq!(
            "forget_only".parse::<CleanupPolicy>().unwrap(),
            CleanupPolicy::ForgetOnly
        );
        for bad in [
            "",
            "delete",
            "FORGET_ONLY",
            "forget-only",
            "delete_on_cleanup ",
        ] {
            assert!(matches!(
                bad.parse::<CleanupPolicy>(),
                Err(Error::InvalidPolicy { .. })
            ));
        }
        assert_eq!(CleanupPolicy::ForgetOnly.to_string(), "forget_only");
    }

    #[test]
    fn scopes_are_validated() {
        assert!(validate_scope("telegram:123:456").is_ok());
        assert!(validate_scope("session/abc def").is_ok());
        assert!(validate_scope("").is_err());
        assert!(validate_scope("a\0b").is_err());
        assert!(validate_scope("a\nb").is_err());
        assert!(validate_scope("a\u{7f}b").is_err());
        assert!(validate_scope("é\u{85}").is_err());
        assert!(validate_scope("chat:é:1").is_ok());
        assert!(validate_scope(&"x".repeat(513)).is_err());
        assert!(validate_scope(&"x".repeat(512)).is_ok());
    }
}
