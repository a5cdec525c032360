//! Managed ingest helpers: caller filenames made safe to keep as metadata,
//! and content types decided from the bytes, the declared type and the
//! extension.

/// Longest filename kept, in bytes (the usual file system limit).
pub const MAX_FILENAME: usize = 255;

/// Makes a caller's filename safe to keep and show: only its last path
/// component, no control characters (NUL included), no path separators, at
/// most 255 bytes cut at a character boundary. Invalid UTF-8
/// is replaced. A name that ends up empty, `.` or `..` becomes `file`.
///
/// The result is metadata only: managed files are named by their digest and
/// never by anything a caller sends.
pub fn sanitize_filename(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let last = text
        .rsplit(['/', '\\'])
        .find(|part| !part.trim().is_empty())
        .unwrap_or("");
    let mut out = String::with_capacity(last.len().min(MAX_FILENAME));
    for c in last.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_FILENAME {
            break;
        }
        out.push(c);
    }
    let trimmed = out.trim();
    if trimmed.is_empty() || trimmed == "." || trimmed == ".." {
        return "file".into();
    }
    trimmed.to_string()
}

/// Types that only say "some container" or "some bytes": a sniff that finds
/// one of these never overrides a more specific declared type (a .docx is a
/// zip, and says so in its declared type).
const GENERIC: &[&str] = &[
    "application/octet-stream",
    "application/zip",
    "application/x-ole-storage",
    "application/x-cfb",
    "text/plain",
];

fn specific(t: &str) -> bool {
    !t.is_empty() && !GENERIC.contains(&t)
}

/// Normalises a declared type: lowercase, parameters dropped, and only if it
/// looks like `type/subtype`.
fn clean_declared(declared: &str) -> Option<String> {
    let base = declared.split(';').next()?.trim().to_ascii_lowercase();
    let (kind, sub) = base.split_once('/')?;
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    (token(kind) && token(sub)).then_some(base)
}

/// Decides a managed object's content type.
///
/// Order: a specific type sniffed from the first bytes; else a specific
/// declared type; else the type of the filename's extension; else whatever
/// generic type the sniff or the declaration gave; else
/// `application/octet-stream`.
pub fn decide_content_type(head: &[u8], declared: &str, filename: &str) -> String {
    let sniffed = infer::get(head).map(|t| t.mime_type().to_string());
    let declared = clean_declared(declared);
    if let Some(s) = sniffed.as_deref().filter(|s| specific(s)) {
        return s.to_string();
    }
    if let Some(d) = declared.as_deref().filter(|d| specific(d)) {
        return d.to_string();
    }
    if let Some(guess) = mime_guess::from_path(filename).first() {
        return guess.essence_str().to_string();
    }
    sniffed
        .or(declared)
        .unwrap_or_else(|| "application/octet-stream".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_paths_controls_and_length() {
        assert_eq!(sanitize_filename(b"../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename(b"/abs/path/a.jpg"), "a.jpg");
        assert_eq!(sanitize_filename(b"C:\\Users\\x\\b.png"), "b.png");
        assert_eq!(sanitize_filename(b"a\0b\nc.txt"), "abc.txt");
        assert_eq!(sanitize_filename(b".."), "file");
        assert_eq!(sanitize_filename(b"dir/.."), "file");
        assert_eq!(sanitize_filename(b""), "file");
        assert_eq!(sanitize_filename(b"foo/"), "foo");
        assert_eq!(sanitize_filename(b"\xff\xfe.jpg"), "\u{fffd}\u{fffd}.jpg");
        let long = "é".repeat(200);
        let got = sanitize_filename(long.as_bytes());
        assert!(got.len() <= MAX_FILENAME && got.len() >= MAX_FILENAME - 1);
        assert!(got.chars().all(|c| c == 'é'));
    }

    #[test]
    fn sniff_wins_unless_it_is_generic() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(decide_content_type(png, "image/jpeg", "a.jpg"), "image/png");
        let zip = b"PK\x03\x04\x14\0\0\0\x08\0";
        let docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
        assert_eq!(decide_content_type(zip, docx, "r.docx"), docx);
        assert_eq!(decide_content_type(zip, "", "r.zip"), "application/zip");
        assert_eq!(
            decide_content_type(b"hello", "text/markdown; charset=utf-8", "x"),
            "text/markdown"
        );
        assert_eq!(decide_content_type(b"hello", "", "notes.txt"), "text/plain");
        assert_eq!(
            decide_content_type(b"hello", "nonsense", "x"),
            "application/octet-stream"
        );
        assert_eq!(decide_content_type(b"", "", ""), "application/octet-stream");
    }
}
