//! Serving a ref's bytes: validators, ranges and headers that keep a
//! browser from running what a chat user uploaded.

use std::time::SystemTime;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Content types a browser may show inline. Everything else (HTML and SVG
/// above all: they run scripts) is sent as an attachment.
const INLINE_SAFE: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "audio/mpeg",
    "audio/ogg",
    "audio/wav",
    "audio/webm",
    "audio/mp4",
    "audio/flac",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "text/plain",
];

/// The type without parameters, lowercased (`"Text/Plain; charset=x"` →
/// `"text/plain"`).
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// True when `content_type` may be shown inline.
pub fn inline_safe(content_type: &str) -> bool {
    INLINE_SAFE.contains(&essence(content_type).as_str())
}

/// RFC 5987 `attr-char`: everything else is percent-encoded.
const ATTR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// A `Content-Disposition` value safe for any filename (RFC 6266): an
/// ASCII fallback in `filename` (quotes, backslashes, controls and
/// non-ASCII replaced) and the exact name in `filename*`.
pub fn disposition(filename: &str, content_type: &str) -> String {
    let kind = if inline_safe(content_type) {
        "inline"
    } else {
        "attachment"
    };
    if filename.is_empty() {
        return kind.to_string();
    }
    let fallback: String = filename
        .chars()
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' => c,
            _ => '_',
        })
        .collect();
    let exact = utf8_percent_encode(filename, ATTR);
    format!("{kind}; filename=\"{fallback}\"; filename*=UTF-8''{exact}")
}

/// The part of a file a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// All of it (no usable `Range`).
    Full,
    /// Bytes `start..=end`.
    Range {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// A range that lies wholly outside the file: 416.
    Unsatisfiable,
}

/// Reads a `Range` header for a file of `size` bytes. One range is
/// served; a header with several, or one that does not parse, is ignored
/// (the whole file is sent), as RFC 9110 allows.
pub fn parse_range(header: Option<&str>, size: u64) -> Want {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Want::Full;
    };
    if spec.contains(',') {
        return Want::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Want::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match num(last) {
            Some(0) => Want::Unsatisfiable,
            Some(_) if size == 0 => Want::Unsatisfiable,
            Some(n) => Want::Range {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            None => Want::Full,
        },
        // bytes=A- : from A to the end.
        (false, true) => match num(first) {
            Some(a) if a >= size => Want::Unsatisfiable,
            Some(a) => Want::Range {
                start: a,
                end: size - 1,
            },
            None => Want::Full,
        },
        (false, false) => match (num(first), num(last)) {
            (Some(a), Some(b)) if a > b => Want::Full,
            (Some(a), Some(_)) if a >= size => Want::Unsatisfiable,
            (Some(a), Some(b)) => Want::Range {
                start: a,
                end: b.min(size - 1),
            },
            _ => Want::Full,
        },
        (true, true) => Want::Full,
    }
}

/// True when an `If-None-Match` value matches `etag` (weak comparison, as
/// RFC 9110 asks for this header).
pub fn none_match(header: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    header.trim() == "*" || header.split(',').any(|t| bare(t) == bare(etag))
}

/// `Last-Modified` text for a time.
pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        let r = |h: &str, size| parse_range(Some(h), size);
        assert_eq!(r("bytes=0-99", 1000), Want::Range { start: 0, end: 99 });
        assert_eq!(
            r("bytes=900-", 1000),
            Want::Range {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            r("bytes=-100", 1000),
            Want::Range {
                start: 900,
                end: 999
            }
        );
        assert_eq!(r("bytes=-5000", 1000), Want::Range { start: 0, end: 999 });
        assert_eq!(
            r("bytes=990-5000", 1000),
            Want::Range {
                start: 990,
                end: 999
            }
        );
        assert_eq!(r("bytes=1000-", 1000), Want::Unsatisfiable);
        assert_eq!(r("bytes=1000-1001", 1000), Want::Unsatisfiable);
        assert_eq!(r("bytes=-0", 1000), Want::Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), Want::Unsatisfiable);
        // Not understood, or several: the whole file.
        assert_eq!(r("bytes=5-2", 1000), Want::Full);
        assert_eq!(r("bytes=0-1,5-6", 1000), Want::Full);
        assert_eq!(r("items=0-1", 1000), Want::Full);
        assert_eq!(r("bytes=x-y", 1000), Want::Full);
        assert_eq!(r("bytes=+1-2", 1000), Want::Full);
        assert_eq!(parse_range(None, 1000), Want::Full);
    }

    #[test]
    fn dispositions_are_safe_for_any_name() {
        assert_eq!(
            disposition("photo.jpg", "image/jpeg"),
            "inline; filename=\"photo.jpg\"; filename*=UTF-8''photo.jpg"
        );
        let d = disposition("evil\".svg\r\nX-Injected: 1", "image/svg+xml");
        assert!(d.starts_with("attachment; "), "{d}");
        assert!(!d.contains('\r') && !d.contains('\n'), "{d}");
        assert_eq!(d.matches('"').count(), 2, "{d}");
        let d = disposition("отчёт 2024.pdf", "application/pdf");
        assert!(
            d.starts_with("attachment; filename=\"_____ 2024.pdf\""),
            "{d}"
        );
        assert!(
            d.ends_with("filename*=UTF-8''%D0%BE%D1%82%D1%87%D1%91%D1%82%202024.pdf"),
            "{d}"
        );
        assert!(disposition("a.html", "text/html; charset=utf-8").starts_with("attachment"));
        assert!(disposition("a.txt", "Text/Plain; charset=utf-8").starts_with("inline"));
        assert_eq!(disposition("", "image/png"), "inline");
    }

    #[test]
    fn if_none_match_lists_and_stars() {
        assert!(none_match("\"abc\"", "\"abc\""));
        assert!(none_match("\"x\", W/\"abc\"", "\"abc\""));
        assert!(none_match("*", "\"abc\""));
        assert!(!none_match("\"abd\"", "\"abc\""));
    }
}
