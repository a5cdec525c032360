//! End to end: a real `mediastore serve` process on a loopback port, driven
//! over HTTP and through the CLI.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mediastore");
const TOKEN: &str = "e2e-secret-token-0123456789";

struct Server {
    child: Child,
    url: String,
    /// The line the server printed on start.
    line: String,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `mediastore serve` on a fresh data dir; `config` is written
    /// to a file and passed with --config.
    fn start(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, config, env)
    }

    fn start_in(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Self {
        let cfg = dir.path().join("mediastore.toml");
        std::fs::write(&cfg, config).unwrap();
        std::fs::create_dir_all(dir.path().join("owned")).unwrap();
        std::fs::create_dir_all(dir.path().join("shared")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn mediastore serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Self {
            child,
            url: addr,
            line,
            dir,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    /// The API's error code, checking the one error shape.
    fn code(&self) -> String {
        let v = self.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        v["error"]["code"].as_str().unwrap().to_string()
    }
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut r = agent().get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    reply(r.call())
}

fn head(url: &str) -> Reply {
    reply(agent().head(url).call())
}

fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut r = agent().post(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    reply(r.send(body))
}

fn post_json(url: &str, body: Value) -> Reply {
    post(
        url,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn delete(url: &str) -> Reply {
    reply(agent().delete(url).call())
}

fn upload(s: &Server, scope: &str, name: &str, bytes: &[u8]) -> Value {
    let r = post(
        &format!("{}/v1/media?scope={scope}", s.url),
        &[
            ("X-Media-Filename", name),
            ("Content-Type", "application/octet-stream"),
        ],
        bytes,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Every regular file under the managed dir.
fn managed_files(s: &Server) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&s.path("data/blobs"), &mut out);
    out
}

fn stats(s: &Server) -> Value {
    let mut v = get(&format!("{}/v1/stats", s.url), &[]).json();
    // The commit count moves with every read-only note; the rest must not.
    v.as_object_mut().unwrap().remove("index_commits");
    v
}

#[test]
fn the_whole_lifecycle_over_http() {
    let s = Server::start("", &[]);
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let m = upload(&s, "chat%3A1", "voice%20note.ogg", &bytes);
    assert_eq!(m["scope"], "chat:1");
    assert_eq!(m["filename"], "voice note.ogg");
    assert_eq!(m["size"], 100_000);
    assert_eq!(m["policy"], "delete_on_cleanup");
    assert_eq!(m["source"], "http");
    assert!(m["expires_at"].is_string(), "{m}");
    assert!(m["stored_at"].is_string(), "{m}");
    let sha = m["sha256"].as_str().unwrap().to_string();
    assert_eq!(sha.len(), 64);
    let id = m["id"].as_str().unwrap().to_string();
    let uuid = m["uuid"].as_str().unwrap().to_string();
    assert_eq!(id, format!("media://{uuid}"));

    // Both spellings of the id.
    let by_uuid = get(&format!("{}/v1/media/{uuid}", s.url), &[]).json();
    let encoded = format!("{}/v1/media/media%3A%2F%2F{uuid}", s.url);
    assert_eq!(get(&encoded, &[]).json(), by_uuid);
    assert_eq!(by_uuid["scopes"][0]["scope"], "chat:1");

    // Download: whole, ranges, validators.
    let content = format!("{}/v1/media/{uuid}/content", s.url);
    let r = get(&content, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);
    assert_eq!(r.header("etag"), format!("\"{sha}\""));
    assert_eq!(r.header("content-length"), "100000");
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    assert_eq!(r.header("content-security-policy"), "sandbox");
    assert_eq!(r.header("cache-control"), "private, immutable");
    // Declared octet-stream, so the extension decides: audio, shown inline.
    assert_eq!(r.header("content-type"), "audio/ogg");
    let cd = r.header("content-disposition");
    assert!(
        cd.starts_with("inline; filename=\"voice note.ogg\""),
        "{cd}"
    );
    assert!(!r.header("last-modified").is_empty());
    let r = get(&content, &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &bytes[10..20]);
    assert_eq!(r.header("content-range"), "bytes 10-19/100000");
    let r = get(&content, &[("Range", "bytes=-5")]);
    assert_eq!(r.body, &bytes[99_995..]);
    let r = get(&content, &[("Range", "bytes=100000-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.code(), "range_not_satisfiable");
    assert_eq!(r.header("content-range"), "bytes */100000");
    let r = get(&content, &[("If-None-Match", &format!("\"{sha}\""))]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    // If-Range with another version: the whole file.
    let r = get(
        &content,
        &[("Range", "bytes=0-0"), ("If-Range", "\"other\"")],
    );
    assert_eq!(r.status, 200);
    let r = head(&content);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), "100000");
    assert!(r.body.is_empty());

    // Custody: the session keeps it when the message goes.
    let r = post_json(
        &format!("{}/v1/media/{uuid}/retain", s.url),
        json!({"scope": "session:1"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["scope"], "session:1");
    let listed = get(&format!("{}/v1/scopes/session%3A1", s.url), &[]).json();
    assert_eq!(listed["refs"][0]["id"], id.as_str());
    let scopes = get(&format!("{}/v1/scopes", s.url), &[]).json();
    assert_eq!(scopes["scopes"].as_array().unwrap().len(), 2, "{scopes}");
    let r = post(&format!("{}/v1/scopes/session:1/touch", s.url), &[], b"");
    assert_eq!(r.json()["holds"], 1);
    let r = delete(&format!("{}/v1/scopes/chat:1", s.url)).json();
    assert_eq!(r["refs_released"], 1);
    assert_eq!(r["files_deleted"], 0);
    assert_eq!(get(&content, &[]).body, bytes);
    let r = delete(&format!("{}/v1/scopes/session:1", s.url)).json();
    assert_eq!(r["refs_removed"], 1);
    assert_eq!(r["files_deleted"], 1);
    assert_eq!(r["bytes_freed"], 100_000);
    assert_eq!(get(&content, &[]).code(), "unknown_ref");
    assert!(managed_files(&s).is_empty(), "{:?}", managed_files(&s));

    let gc = post(&format!("{}/v1/gc", s.url), &[], b"");
    assert_eq!(gc.status, 200);
    assert_eq!(gc.json()["refs_expired"], 0);
    assert_eq!(get(&format!("{}/healthz", s.url), &[]).status, 200);
    assert_eq!(get(&format!("{}/readyz", s.url), &[]).status, 200);
    let doc = get(&format!("{}/openapi.json", s.url), &[]).json();
    assert_eq!(doc["openapi"], "3.1.0");
    let metrics = String::from_utf8(get(&format!("{}/metrics", s.url), &[]).body).unwrap();
    assert!(
        metrics.contains("mediastore_http_requests_total{route=\"/v1/media/{id}/content\",method=\"GET\",status=\"206\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("mediastore_sweeps_total 1"), "{metrics}");
    assert!(metrics.contains("mediastore_refs 0"), "{metrics}");
}

#[test]
fn multipart_uploads_and_registered_files() {
    let s = Server::start(
        &format!(
            "[store]\nowned_roots = [{:?}]\nshared_roots = [{:?}]\n",
            "owned", "shared"
        ),
        &[],
    );
    let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nignored\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"pic.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n0000IHDR\r\n--XyZ--\r\n";
    let r = post(
        &format!("{}/v1/media?scope=chat:2&source=telegram", s.url),
        &[("Content-Type", "multipart/form-data; boundary=XyZ")],
        body,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let m = r.json();
    assert_eq!(m["filename"], "pic.png");
    assert_eq!(m["content_type"], "image/png");
    assert_eq!(m["source"], "telegram");
    assert_eq!(m["size"], 16);
    let r = post(
        &format!("{}/v1/media?scope=chat:2", s.url),
        &[("Content-Type", "multipart/form-data; boundary=XyZ")],
        b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--XyZ--\r\n",
    );
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));

    // Register: under an owned root by default delete_on_cleanup, under a
    // shared root forget_only; anything else refused.
    std::fs::write(s.path("owned/a.jpg"), b"\xff\xd8\xff\xe0jpeg").unwrap();
    std::fs::write(s.path("shared/b.txt"), b"shared").unwrap();
    std::fs::write(s.path("outside.txt"), b"outside").unwrap();
    std::os::unix::fs::symlink(s.path("outside.txt"), s.path("owned/link.txt")).unwrap();
    let reg = |path: PathBuf, extra: Value| {
        let mut body = json!({"path": path, "scope": "chat:3"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        post_json(&format!("{}/v1/media/register", s.url), body)
    };
    let r = reg(s.path("owned/a.jpg"), json!({}));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["policy"], "delete_on_cleanup");
    assert_eq!(r.json()["content_type"], "image/jpeg");
    assert_eq!(r.json()["managed"], false);
    let r = reg(s.path("shared/b.txt"), json!({"source": "agent"}));
    assert_eq!(r.json()["policy"], "forget_only");
    let r = reg(
        s.path("shared/b.txt"),
        json!({"policy": "delete_on_cleanup"}),
    );
    assert_eq!((r.status, r.code().as_str()), (403, "not_owned"));
    let r = reg(s.path("outside.txt"), json!({}));
    assert_eq!((r.status, r.code().as_str()), (403, "outside_roots"));
    let r = reg(s.path("owned/link.txt"), json!({}));
    assert_eq!((r.status, r.code().as_str()), (403, "outside_roots"));
    let r = reg(s.path("owned/../outside.txt"), json!({}));
    assert_eq!((r.status, r.code().as_str()), (403, "outside_roots"));
    let r = reg(PathBuf::from("owned/a.jpg"), json!({}));
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));
    let r = reg(s.path("owned/a.jpg"), json!({"policy": "shred"}));
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_policy"));
    let r = reg(s.path("owned/missing.jpg"), json!({}));
    assert_eq!((r.status, r.code().as_str()), (404, "file_not_found"));
    let r = reg(s.path("owned/a.jpg"), json!({"unknown": 1}));
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));

    // A registered file removed behind the store's back: 410 on download.
    std::fs::write(s.path("owned/gone.bin"), b"soon gone").unwrap();
    let r = reg(s.path("owned/gone.bin"), json!({}));
    let gone = r.json()["uuid"].as_str().unwrap().to_string();
    std::fs::remove_file(s.path("owned/gone.bin")).unwrap();
    let r = get(&format!("{}/v1/media/{gone}/content", s.url), &[]);
    assert_eq!((r.status, r.code().as_str()), (410, "file_vanished"));

    // Releasing deletes the owned file, keeps the shared one.
    let r = delete(&format!("{}/v1/scopes/chat:3", s.url)).json();
    assert_eq!(r["files_deleted"], 1, "{r}");
    assert!(!s.path("owned/a.jpg").exists());
    assert!(s.path("shared/b.txt").exists());
    assert!(s.path("outside.txt").exists());
}

#[test]
fn bad_input_gets_its_status_and_changes_nothing() {
    let s = Server::start("[store]\nmax_object_size = \"64KiB\"\n", &[]);
    upload(&s, "chat:1", "keep.bin", b"keep me");
    let before = stats(&s);
    let files_before = managed_files(&s);
    let cases: Vec<(Reply, u16, &str)> = vec![
        (
            get(&format!("{}/v1/media/not-a-uuid", s.url), &[]),
            400,
            "invalid_ref",
        ),
        (
            get(&format!("{}/v1/media/media%3A%2F%2Fzzz", s.url), &[]),
            400,
            "invalid_ref",
        ),
        (
            get(
                &format!("{}/v1/media/0b7e2b7c-3f0a-4c1a-9d7e-2f9a1b3c4d5e", s.url),
                &[],
            ),
            404,
            "unknown_ref",
        ),
        (
            get(
                &format!(
                    "{}/v1/media/0b7e2b7c-3f0a-4c1a-9d7e-2f9a1b3c4d5e/content",
                    s.url
                ),
                &[],
            ),
            404,
            "unknown_ref",
        ),
        (
            post(&format!("{}/v1/media", s.url), &[], b"x"),
            400,
            "bad_request",
        ),
        (
            post(&format!("{}/v1/media?scope=", s.url), &[], b"x"),
            400,
            "invalid_scope",
        ),
        (
            post(&format!("{}/v1/media?scope=a%00b", s.url), &[], b"x"),
            400,
            "invalid_scope",
        ),
        (
            delete(&format!("{}/v1/scopes/a%0Ab", s.url)),
            400,
            "invalid_scope",
        ),
        (
            post(
                &format!("{}/v1/scopes/{}/touch", s.url, "x".repeat(600)),
                &[],
                b"",
            ),
            400,
            "invalid_scope",
        ),
        (
            post(
                &format!("{}/v1/media?scope=big", s.url),
                &[],
                &vec![7u8; 65 << 10],
            ),
            413,
            "too_large",
        ),
        (
            post_json(
                &format!(
                    "{}/v1/media/0b7e2b7c-3f0a-4c1a-9d7e-2f9a1b3c4d5e/retain",
                    s.url
                ),
                json!({"scope": "s"}),
            ),
            404,
            "unknown_ref",
        ),
        (
            post(
                &format!("{}/v1/media/register", s.url),
                &[("Content-Type", "application/json")],
                b"{not json",
            ),
            400,
            "bad_request",
        ),
        (get(&format!("{}/v2/nothing", s.url), &[]), 404, "not_found"),
        (
            reply(agent().put(&format!("{}/v1/gc", s.url)).send(&b""[..])),
            405,
            "method_not_allowed",
        ),
    ];
    for (r, status, code) in cases {
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // A traversal-laden filename is metadata only; the bytes land in the
    // managed dir under their digest.
    let m = upload(&s, "chat:9", "..%2F..%2Fetc%2Fpasswd", b"not a passwd");
    assert!(!m["filename"].as_str().unwrap().contains('/'), "{m}");
    assert!(
        m["path"]
            .as_str()
            .unwrap()
            .starts_with(s.path("data/blobs").to_str().unwrap())
    );
    delete(&format!("{}/v1/scopes/chat:9", s.url));
    // A scope is a name, never a path: one full of traversal lands in the
    // managed dir like any other.
    let m = upload(&s, "..%2F..%2F..%2Ftmp", "x.bin", b"scoped");
    assert_eq!(m["scope"], "../../../tmp");
    assert!(
        m["path"]
            .as_str()
            .unwrap()
            .starts_with(s.path("data/blobs").to_str().unwrap())
    );
    delete(&format!("{}/v1/scopes/..%2F..%2F..%2Ftmp", s.url));
    // Streamed without a length: cut off at the cap while streaming, and
    // nothing left behind.
    let chunks = std::iter::repeat_n(vec![1u8; 16 << 10], 16)
        .flatten()
        .collect::<Vec<u8>>();
    let mut reader = &chunks[..];
    let r = reply(
        agent()
            .post(&format!("{}/v1/media?scope=big", s.url))
            .send(ureq::SendBody::from_reader(&mut reader)),
    );
    assert_eq!((r.status, r.code().as_str()), (413, "too_large"));
    // The same through multipart.
    let mut body =
        b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n"
            .to_vec();
    body.extend(std::iter::repeat_n(9u8, 200 << 10));
    body.extend_from_slice(b"\r\n--B--\r\n");
    let r = post(
        &format!("{}/v1/media?scope=big", s.url),
        &[("Content-Type", "multipart/form-data; boundary=B")],
        &body,
    );
    assert_eq!((r.status, r.code().as_str()), (413, "too_large"));
    assert_eq!(stats(&s), before);
    assert_eq!(managed_files(&s), files_before);
}

#[test]
fn full_quotas_answer_507_and_keep_nothing() {
    let s = Server::start(
        "[store]\nmax_scope_bytes = \"1KiB\"\nmax_total_bytes = \"3KiB\"\n",
        &[],
    );
    upload(&s, "a", "one.bin", &[1u8; 1000]);
    let r = post(&format!("{}/v1/media?scope=a", s.url), &[], &[2u8; 100]);
    assert_eq!((r.status, r.code().as_str()), (507, "quota_exceeded"));
    upload(&s, "b", "two.bin", &[3u8; 1000]);
    upload(&s, "c", "three.bin", &[4u8; 1000]);
    let before = managed_files(&s);
    let r = post(&format!("{}/v1/media?scope=d", s.url), &[], &[5u8; 500]);
    assert_eq!((r.status, r.code().as_str()), (507, "quota_exceeded"));
    assert_eq!(managed_files(&s), before);
}

#[test]
fn tokens_guard_everything_but_the_probes() {
    let s = Server::start("", &[("MEDIASTORE__SERVER__TOKENS", TOKEN)]);
    let url = format!("{}/v1/stats", s.url);
    let r = get(&url, &[]);
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    assert!(r.header("www-authenticate").starts_with("Bearer"));
    let r = get(&url, &[("Authorization", "Bearer wrong-token-wrong-token")]);
    assert_eq!(r.status, 401);
    let r = get(&url, &[("Authorization", &format!("Bearer {TOKEN}"))]);
    assert_eq!(r.status, 200);
    let r = get(&url, &[("Authorization", &format!("bearer {TOKEN}"))]);
    assert_eq!(r.status, 200);
    let r = get(&url, &[("Authorization", &format!("Basic {TOKEN}"))]);
    assert_eq!(r.status, 401);
    let r = get(&url, &[("Authorization", &format!("Bearer {TOKEN}x"))]);
    assert_eq!(r.status, 401);
    let r = post(&format!("{}/v1/media?scope=a", s.url), &[], b"x");
    assert_eq!(r.status, 401);
    assert_eq!(get(&format!("{}/metrics", s.url), &[]).status, 401);
    assert_eq!(get(&format!("{}/healthz", s.url), &[]).status, 200);
    assert_eq!(get(&format!("{}/readyz", s.url), &[]).status, 200);
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without a token"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing may be created");
}

#[test]
fn metrics_can_move_to_their_own_listener() {
    let s = Server::start("[server]\nmetrics_listen = \"127.0.0.1:0\"\n", &[]);
    let metrics = s
        .line
        .split_whitespace()
        .map(|w| w.trim_end_matches([')', ',']))
        .find(|w| w.ends_with("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {:?}", s.line))
        .to_string();
    // Not on the API's listener any more.
    let r = get(&format!("{}/metrics", s.url), &[]);
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    get(&format!("{}/v1/stats", s.url), &[]);
    let text = String::from_utf8(get(&metrics, &[]).body).unwrap();
    assert!(
        text.contains(
            "mediastore_http_requests_total{route=\"/v1/stats\",method=\"GET\",status=\"200\"} 1"
        ),
        "{text}"
    );
}

#[test]
fn a_release_during_a_download_does_not_cut_it_short() {
    let s = Server::start("", &[]);
    let bytes: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let m = upload(&s, "chat:1", "big.bin", &bytes);
    let uuid = m["uuid"].as_str().unwrap();
    let mut resp = agent()
        .get(&format!("{}/v1/media/{uuid}/content", s.url))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut reader = resp.body_mut().with_config().limit(1 << 30).reader();
    let mut got = vec![0u8; 1 << 20];
    reader.read_exact(&mut got).unwrap();
    let r = delete(&format!("{}/v1/scopes/chat:1", s.url)).json();
    assert_eq!(r["files_deleted"], 1);
    assert!(managed_files(&s).is_empty());
    reader.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), bytes.len());
    assert!(got == bytes, "the download changed under the release");
    assert_eq!(
        get(&format!("{}/v1/media/{uuid}/content", s.url), &[]).code(),
        "unknown_ref"
    );
}

#[test]
fn shutdown_with_uploads_in_flight_loses_nothing_acknowledged() {
    let mut s = Server::start("", &[]);
    let url = s.url.clone();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0.. {
                    let body = format!("worker {w} upload {i}").repeat(200);
                    let r = agent()
                        .post(&format!("{url}/v1/media?scope=w{w}"))
                        .send(body.as_bytes());
                    match r {
                        Ok(mut r) if r.status().as_u16() == 201 => {
                            let v: Value =
                                serde_json::from_str(&r.body_mut().read_to_string().unwrap())
                                    .unwrap();
                            acked.push((v["uuid"].as_str().unwrap().to_string(), body));
                        }
                        // Refused or cut off by the shutdown: not acknowledged.
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let status = s.stop();
    assert!(status.success(), "{status:?}");
    let acked: Vec<(String, String)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        acked.len() > 10,
        "only {} uploads before the stop",
        acked.len()
    );
    // Reopen the data dir with the CLI: every acknowledged upload is there.
    let data = s.path("data");
    for (uuid, body) in &acked {
        let out = Command::new(BIN)
            .args(["get", uuid, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{uuid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, body.as_bytes());
    }
}

/// Runs the CLI; returns (exit code, stdout, stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("MEDIASTORE_SERVER")
        .env_remove("MEDIASTORE_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The same script of CLI commands, against a server or a data dir.
fn cli_script(target: &[&str], env: &[(&str, &str)], work: &Path) {
    let file = work.join("photo.jpg");
    std::fs::write(&file, b"\xff\xd8\xff\xe0 a photo").unwrap();
    let with = |extra: &[&str]| -> Vec<String> {
        extra.iter().chain(target).map(|s| s.to_string()).collect()
    };
    let run = |extra: &[&str]| {
        let args = with(extra);
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
    };
    let (code, out, err) = run(&["put", file.to_str().unwrap(), "--scope", "chat:1"]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    assert!(id.starts_with("media://"), "{out}");
    let (code, out, _) = run(&["meta", &id, "--json"]);
    assert_eq!(code, 0);
    let meta: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(meta["filename"], "photo.jpg");
    assert_eq!(meta["content_type"], "image/jpeg");
    assert_eq!(meta["scopes"][0]["scope"], "chat:1");
    let (code, out, _) = run(&["meta", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("held by") && out.contains("chat:1"), "{out}");
    let copy = work.join("copy.jpg");
    let (code, _, err) = run(&["get", &id, "-o", copy.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&file).unwrap());
    let (code, _, _) = run(&["retain", &id, "session:1"]);
    assert_eq!(code, 0);
    let (code, out, _) = run(&["ls", "--scope", "session:1", "--json"]);
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["refs"][0]["id"], id.as_str());
    let (code, out, _) = run(&["ls"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("chat:1  1") && out.contains("session:1  1"),
        "{out}"
    );
    let (code, out, _) = run(&["touch", "session:1", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["holds"], 1);
    let (code, out, _) = run(&["release", "chat:1"]);
    assert_eq!(code, 0);
    assert!(out.contains("released 1 refs"), "{out}");
    let (code, out, _) = run(&["release", "session:1", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["files_deleted"],
        1
    );
    let (code, out, _) = run(&["gc", "--json"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run(&["stats", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["refs"], 0);
    // Exit codes scripts can branch on.
    let (code, _, err) = run(&["meta", "media://0b7e2b7c-3f0a-4c1a-9d7e-2f9a1b3c4d5e"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = run(&["meta", "media://nope"]);
    assert_eq!(code, 4, "{err}");
    let (code, _, _) = run(&["put", "/definitely/not/here", "--scope", "x"]);
    assert_eq!(code, 4);
    let (code, _, _) = run(&["bogus-command"]);
    assert_eq!(code, 2);
}

#[test]
fn the_cli_works_against_a_server_and_on_a_data_dir() {
    let s = Server::start("", &[("MEDIASTORE__SERVER__TOKENS", TOKEN)]);
    cli_script(
        &["--server", &s.url],
        &[("MEDIASTORE_TOKEN", TOKEN)],
        s.dir.path(),
    );
    // Without the token: 5; the data dir is held by the server: 6.
    let (code, _, err) = cli(&["stats", "--server", &s.url], &[]);
    assert_eq!(code, 5, "{err}");
    let data = s.path("data");
    let (code, _, err) = cli(&["stats", "--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("--server"), "{err}");
    let (code, _, err) = cli(&["stats", "--server", "http://127.0.0.1:9"], &[]);
    assert_eq!(code, 6, "{err}");

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    cli_script(&["--data-dir", data.to_str().unwrap()], &[], dir.path());
}

/// A directory on a registered path swapped for a symlink to outside the
/// roots, back and forth, while registrations run: every registration that
/// succeeds must be of the file inside the root, never the one outside.
#[test]
fn register_cannot_be_raced_outside_the_roots() {
    let s = Server::start("[store]\nowned_roots = [\"owned\"]\n", &[]);
    std::fs::create_dir_all(s.path("owned/dir")).unwrap();
    std::fs::write(s.path("owned/dir/file.txt"), b"inside").unwrap();
    std::fs::create_dir_all(s.path("outside")).unwrap();
    std::fs::write(s.path("outside/file.txt"), b"OUTSIDE").unwrap();
    std::os::unix::fs::symlink(s.path("outside"), s.path("owned/alt")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, dir, alt) = (stop.clone(), s.path("owned/dir"), s.path("owned/alt"));
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &dir,
                    rustix::fs::CWD,
                    &alt,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let (mut ok, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let r = post_json(
            &format!("{}/v1/media/register", s.url),
            json!({"path": s.path("owned/dir/file.txt"), "scope": "race", "policy": "forget_only"}),
        );
        match r.status {
            201 => {
                ok += 1;
                let uuid = r.json()["uuid"].as_str().unwrap().to_string();
                let got = get(&format!("{}/v1/media/{uuid}/content", s.url), &[]);
                // The registered file is the inside one; it may since have
                // been swapped away (410), but never be the outside one.
                assert_ne!(got.body, b"OUTSIDE", "registered a file outside the roots");
                assert!(got.status == 200 || got.status == 410, "{}", got.status);
                if got.status == 200 {
                    assert_eq!(got.body, b"inside");
                }
            }
            403 | 404 => refused += 1,
            other => panic!("{other}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(
        ok > 10 && refused > 10,
        "ok {ok}, refused {refused}, swaps {swaps}"
    );
    // No private registration scope is left behind.
    let scopes = get(&format!("{}/v1/scopes", s.url), &[]).json();
    for sc in scopes["scopes"].as_array().unwrap() {
        assert_eq!(sc["scope"], "race", "{scopes}");
    }
}

/// The background cleaner expires holds, deletes their files and counts
/// its sweeps in the metrics.
#[test]
fn the_cleaner_sweeps_and_reports_to_metrics() {
    let s = Server::start("[cleaner]\nmax_age = \"1s\"\ninterval = \"200ms\"\n", &[]);
    let m = upload(&s, "chat:1", "short.bin", b"short-lived");
    let uuid = m["uuid"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = String::from_utf8(get(&format!("{}/metrics", s.url), &[]).body).unwrap();
        if metrics.contains("mediastore_sweep_files_deleted_total 1") {
            assert!(
                metrics.contains("mediastore_sweep_refs_expired_total 1"),
                "{metrics}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no sweep reported: {metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        get(&format!("{}/v1/media/{uuid}", s.url), &[]).code(),
        "unknown_ref"
    );
    assert!(managed_files(&s).is_empty());
}

/// A client that waits for `100 Continue` before sending an oversize body
/// is refused at once, never invited to send it.
#[test]
fn an_oversize_upload_awaiting_continue_is_refused_without_being_invited() {
    use std::io::Write;
    let s = Server::start("[store]\nmax_object_size = \"1MiB\"\n", &[]);
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "POST /v1/media?scope=big HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 10737418240\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal waited for a body: {:?}",
        started.elapsed()
    );
}
