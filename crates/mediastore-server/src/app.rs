//! The HTTP API: routes, auth, request accounting and the handlers.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::{FromRequest, MatchedPath, Query, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use mediastore::{CleanupPolicy, DurableStore, MediaMeta, MediaRef, MediaStore, PutLimits};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::content::{self, Want};
use crate::error::{ApiError, code_for_status};
use crate::metrics::Metrics;
use crate::views;

/// Bytes per chunk of a download: large enough that a big file goes out in
/// few system calls, small enough to keep memory flat.
const DOWNLOAD_CHUNK: usize = 256 << 10;

/// Routes that answer without a token (probes).
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// What every handler shares.
pub struct AppState {
    /// The store.
    pub store: Arc<DurableStore>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// False once shutdown began: `/readyz` then fails.
    pub ready: AtomicBool,
    tokens: Vec<String>,
    /// Canonical dirs under which files may be registered.
    roots: Vec<PathBuf>,
    max_object: u64,
}

impl AppState {
    /// State for `store`. `roots` are the dirs files may be registered
    /// from (made canonical here); `tokens` empty means no auth.
    pub fn new(
        store: Arc<DurableStore>,
        metrics: Arc<Metrics>,
        tokens: Vec<String>,
        roots: &[PathBuf],
        max_object: u64,
    ) -> io::Result<Self> {
        let roots = roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r)
                    .map_err(|e| io::Error::new(e.kind(), format!("root {}: {e}", r.display())))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            store,
            metrics,
            ready: AtomicBool::new(true),
            tokens,
            roots,
            max_object,
        })
    }
}

type Shared = Arc<AppState>;

/// A router that remembers each (method, path) it serves, so the OpenAPI
/// document can be checked against it.
struct Routes {
    router: Router<Shared>,
    table: Vec<(&'static str, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, method: &'static str, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Shared>,
        T: 'static,
    {
        let filter = match method {
            "get" => MethodFilter::GET,
            "head" => MethodFilter::HEAD,
            "post" => MethodFilter::POST,
            "delete" => MethodFilter::DELETE,
            other => unreachable!("method {other} is not used"),
        };
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }
}

fn routes(metrics_on_main: bool) -> Routes {
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    };
    let r = r
        .add("post", "/v1/media", upload)
        .add("post", "/v1/media/register", register)
        .add("get", "/v1/media/{id}", media_info)
        .add("get", "/v1/media/{id}/content", download)
        .add("head", "/v1/media/{id}/content", download)
        .add("post", "/v1/media/{id}/retain", retain)
        .add("get", "/v1/scopes", scope_list)
        .add("get", "/v1/scopes/{scope}", scope_refs)
        .add("delete", "/v1/scopes/{scope}", release)
        .add("post", "/v1/scopes/{scope}/touch", touch)
        .add("post", "/v1/gc", gc)
        .add("get", "/v1/stats", stats)
        .add("get", "/healthz", healthz)
        .add("get", "/readyz", readyz)
        .add("get", "/openapi.json", openapi);
    if metrics_on_main {
        r.add("get", "/metrics", metrics)
    } else {
        r
    }
}

/// The (method, path) pairs the API serves; `/metrics` is among them
/// unless it has its own listener.
pub fn route_table(metrics_on_main: bool) -> Vec<(&'static str, &'static str)> {
    routes(metrics_on_main).table
}

/// The API's router, with auth, request accounting and the one error
/// shape.
pub fn router(state: Shared, metrics_on_main: bool) -> Router {
    routes(metrics_on_main)
        .router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // Upload size is our quota, enforced while streaming; the
        // framework's own 2 MB cap would cut off every real upload.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The router of a separate metrics listener: `/metrics` only, no token.
pub fn metrics_router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Compares without leaking, through timing, how much of a token matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if st.tokens.is_empty() || OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok = given.is_some_and(|t| {
        st.tokens
            .iter()
            .any(|k| same_secret(k.as_bytes(), t.as_bytes()))
    });
    if !ok {
        let why = if given.is_some() {
            "wrong bearer token"
        } else {
            "missing bearer token (Authorization: Bearer ...)"
        };
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why).into_response();
    }
    next.run(req).await
}

/// Times and counts every request, logs one line for it, and gives any
/// error the framework answered on its own the API's JSON shape.
async fn observe(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_name(req.method());
    // Kept past `next.run` by cheap clones (an `Arc<str>`, a shared `Uri`).
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map_or("unmatched", |m| m.as_str());
    let uri = req.uri().clone();
    let mut resp = next.run(req).await;
    let status = resp.status();
    if status.as_u16() >= 400 && !is_json(resp.headers()) {
        let (parts, body) = resp.into_parts();
        let text = axum::body::to_bytes(body, 64 << 10)
            .await
            .unwrap_or_default();
        let mut message = String::from_utf8_lossy(&text).trim().to_string();
        if message.is_empty() {
            message = status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_ascii_lowercase();
        }
        let mut fixed = ApiError::new(status, code_for_status(status), message).into_response();
        for (name, value) in parts.headers.iter() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                fixed.headers_mut().insert(name, value.clone());
            }
        }
        resp = fixed;
    }
    let took = started.elapsed();
    st.metrics.request(route, method, status.as_u16(), took);
    tracing::info!(
        method,
        path = uri.path(),
        route,
        status = status.as_u16(),
        micros = took.as_micros() as u64,
        "request"
    );
    resp
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// A ref in a path: the bare UUID or the (percent-decoded) `media://` form.
fn parse_ref(id: &str) -> Result<MediaRef, ApiError> {
    Ok(MediaRef::parse_lenient(id.trim())?)
}

#[derive(Deserialize)]
struct UploadQuery {
    scope: Option<String>,
    filename: Option<String>,
    source: Option<String>,
}

/// A header value as text; `X-Media-Filename` may be percent-encoded
/// UTF-8 (headers are ASCII).
fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?;
    Some(
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

async fn upload(
    State(st): State<Shared>,
    Query(q): Query<UploadQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let scope = q.scope.ok_or_else(|| {
        ApiError::bad_request("the scope query parameter is required (?scope=...)")
    })?;
    mediastore::validate_scope(&scope)?;
    let headers = req.headers();
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut filename = header_text(headers, "x-media-filename").or(q.filename);
    let source = header_text(headers, "x-media-source")
        .or(q.source)
        .unwrap_or_else(|| "http".into());
    // Refused before reading a byte when the client says it is too big.
    if declared_len.is_some_and(|len| len > st.max_object) {
        // A client waiting for `100 Continue` (curl, for big bodies) has
        // sent nothing and, unanswered, never will: reading the body would
        // invite it. Any other client is already sending.
        if !expects_continue {
            let mut body =
                StreamReader::new(req.into_body().into_data_stream().map_err(io::Error::other));
            linger(&mut body).await;
        }
        return Err(mediastore::Error::TooLarge {
            limit: st.max_object,
        }
        .into());
    }
    let limits = PutLimits {
        max_bytes: Some(st.max_object),
    };
    let report = if declared.starts_with("multipart/form-data") {
        let mut form = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        loop {
            let Some(field) = form
                .next_field()
                .await
                .map_err(|e| ApiError::bad_request(e.body_text()))?
            else {
                return Err(ApiError::bad_request(
                    "the multipart body has no field named \"file\"",
                ));
            };
            if field.name() != Some("file") {
                continue;
            }
            if filename.is_none() {
                filename = field.file_name().map(String::from);
            }
            let content_type = field.content_type().unwrap_or("").to_string();
            let meta = MediaMeta::new(filename.clone().unwrap_or_default(), content_type, &source);
            let stream = field.map_err(|e| io::Error::other(e.body_text()));
            let mut reader = StreamReader::new(Box::pin(stream));
            match st.store.put(&mut reader, &meta, &scope, &limits).await {
                Ok(report) => break report,
                Err(e) => {
                    linger(&mut reader).await;
                    return Err(e.into());
                }
            }
        }
    } else {
        let meta = MediaMeta::new(filename.unwrap_or_default(), declared, &source);
        let mut body =
            StreamReader::new(req.into_body().into_data_stream().map_err(io::Error::other));
        match st.store.put(&mut body, &meta, &scope, &limits).await {
            Ok(report) => report,
            Err(e) => {
                linger(&mut body).await;
                return Err(e.into());
            }
        }
    };
    let mut v = views::in_scope(&st.store, report.media_ref, &scope)?;
    v["deduplicated"] = json!(report.deduplicated);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Most of a refused upload read and thrown away before answering.
const LINGER_BYTES: u64 = 16 << 20;
/// Longest time spent doing so.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards what is left of a refused upload (bounded in bytes
/// and time) before the error goes out. A client that sends its whole body
/// before reading the answer then gets the answer, not a reset connection;
/// nginx's lingering close does the same. Beyond the bound the connection
/// is closed.
async fn linger(body: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut rest = body.take(LINGER_BYTES);
    let _ = tokio::time::timeout(
        LINGER_TIME,
        tokio::io::copy(&mut rest, &mut tokio::io::sink()),
    )
    .await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    path: PathBuf,
    scope: String,
    filename: Option<String>,
    content_type: Option<String>,
    source: Option<String>,
    policy: Option<String>,
}

async fn register(
    State(st): State<Shared>,
    body: Result<Json<RegisterBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    mediastore::validate_scope(&b.scope)?;
    let policy = b
        .policy
        .as_deref()
        .map(str::parse::<CleanupPolicy>)
        .transpose()?;
    if !b.path.is_absolute() {
        return Err(ApiError::bad_request("path must be absolute"));
    }
    // Symlinks are resolved first: what counts is where the file really is.
    let real = tokio::fs::canonicalize(&b.path)
        .await
        .map_err(|e| mediastore::Error::File {
            path: b.path.clone(),
            source: e,
        })?;
    let opened = open_beneath(&st, &real).await?;
    let filename = b.filename.unwrap_or_else(|| {
        real.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let content_type = mediastore::decide_content_type(
        &opened.head,
        b.content_type.as_deref().unwrap_or(""),
        &filename,
    );
    let mut meta = MediaMeta::new(
        filename,
        content_type,
        b.source.unwrap_or_else(|| "http".into()),
    );
    meta.policy = policy;
    let id = register_checked(&st, &real, &meta, &b.scope, opened.identity).await?;
    let v = views::in_scope(&st.store, id, &b.scope)?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

fn outside_roots(path: &Path) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "outside_roots",
        format!(
            "{} is not under a configured root (store.owned_roots, store.shared_roots)",
            path.display()
        ),
    )
}

/// A file to register, as opened beneath its root.
struct Opened {
    /// Device and inode; `None` on a kernel without `openat2`, where the
    /// canonical path's check is all there is.
    identity: Option<(u64, u64)>,
    /// The first bytes, for sniffing the content type.
    head: Vec<u8>,
}

/// Opens `real` (canonical) beneath the root it lies under: the kernel
/// refuses to leave the root on the way (`openat2(RESOLVE_BENEATH)`), so
/// the file opened is inside it even if a directory on the path was
/// swapped for a symlink since `canonicalize`.
async fn open_beneath(st: &AppState, real: &Path) -> Result<Opened, ApiError> {
    let (root, rel) = st
        .roots
        .iter()
        .find_map(|root| Some((root.clone(), real.strip_prefix(root).ok()?.to_path_buf())))
        .ok_or_else(|| outside_roots(real))?;
    let path = real.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || read_beneath(&root, &rel, &path))
        .await
        .map_err(|e| mediastore::Error::io("opening a registered file", io::Error::other(e)))?;
    opened.map_err(|e| {
        use rustix::io::Errno;
        // EXDEV: the walk would leave the root; ELOOP: too many links.
        let escaped = e
            .raw_os_error()
            .is_some_and(|n| n == Errno::XDEV.raw_os_error() || n == Errno::LOOP.raw_os_error());
        if escaped {
            outside_roots(real)
        } else {
            mediastore::Error::File {
                path: real.to_path_buf(),
                source: e,
            }
            .into()
        }
    })
}

fn read_beneath(root: &Path, rel: &Path, real: &Path) -> io::Result<Opened> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::io::Read;
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // Non-blocking: a FIFO planted under a root must not hang the request.
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let (identity, mut file) = match rustix::fs::openat2(
        &dir,
        rel,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => {
            let st = rustix::fs::fstat(&fd)?;
            (Some((st.st_dev, st.st_ino)), std::fs::File::from(fd))
        }
        Err(rustix::io::Errno::NOSYS) => {
            let fd = rustix::fs::open(real, flags, Mode::empty())?;
            (None, std::fs::File::from(fd))
        }
        Err(e) => return Err(e.into()),
    };
    let mut head = Vec::with_capacity(8192);
    // A directory or unreadable file sniffs as nothing; the store refuses
    // what it cannot register.
    let _ = (&mut file).take(8192).read_to_end(&mut head);
    Ok(Opened { identity, head })
}

/// Registers `real`, keeping the ref only if the store registered the file
/// that was opened beneath the root (`want`): the ref is made under a
/// private scope and moves to the caller's scope only then; otherwise it is
/// released and the request refused.
async fn register_checked(
    st: &AppState,
    real: &Path,
    meta: &MediaMeta,
    scope: &str,
    want: Option<(u64, u64)>,
) -> Result<MediaRef, ApiError> {
    let Some(want) = want else {
        return Ok(st.store.store(real, meta, scope).await?);
    };
    let private = format!("mediastore:register:{}", uuid::Uuid::new_v4());
    let id = st.store.store(real, meta, &private).await?;
    let got = st.store.core().resolve(id)?.file;
    let moved = if (got.dev, got.ino) == want {
        st.store.retain(id, scope).await.map_err(ApiError::from)
    } else {
        Err(outside_roots(real))
    };
    // The private scope holds only this ref.
    st.store.release_all(&private).await?;
    moved.map(|()| id)
}

async fn media_info(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(views::media(&st.store, parse_ref(&id)?)?))
}

async fn download(
    State(st): State<Shared>,
    method: Method,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_ref(&id)?;
    // Opened before anything else: a release that deletes the file after
    // this point cannot cut the download short.
    let (file, r) = st.store.open(id).await?;
    let meta = file.metadata().map_err(|e| mediastore::Error::File {
        path: r.path.to_path_buf(),
        source: e,
    })?;
    let size = meta.len();
    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let etag = match st.store.digest(&r) {
        Some(sha) => format!("\"{sha}\""),
        // A registered file has no digest: its identity and version stand in.
        None => {
            let nanos = modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("\"{:x}-{:x}-{size:x}-{nanos:x}\"", r.file.ino, r.file.born)
        }
    };
    let content_type = if r.meta.content_type.is_empty() {
        "application/octet-stream".to_string()
    } else {
        r.meta.content_type.clone()
    };
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, content::http_date(modified))
        .header(header::CACHE_CONTROL, "private, immutable")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CONTENT_SECURITY_POLICY, "sandbox");
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|inm| content::none_match(inm, &etag));
    if not_modified {
        return Ok(builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response"));
    }
    builder = builder
        .header(header::CONTENT_TYPE, header_value(&content_type))
        .header(
            header::CONTENT_DISPOSITION,
            header_value(&content::disposition(&r.meta.filename, &content_type)),
        );
    // If-Range: the range only holds for the version the client has.
    let range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| range_ok);
    let (status, start, len) = match content::parse_range(range, size) {
        Want::Full => (StatusCode::OK, 0, size),
        Want::Range { start, end } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Want::Unsatisfiable => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the file has {size} bytes"),
            )
            .into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{size}")),
            );
            return Ok(resp);
        }
    };
    builder = builder.status(status).header(header::CONTENT_LENGTH, len);
    if method == Method::HEAD {
        return Ok(builder.body(Body::empty()).expect("valid response"));
    }
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 {
        file.seek(io::SeekFrom::Start(start))
            .await
            .map_err(|e| mediastore::Error::File {
                path: r.path.to_path_buf(),
                source: e,
            })?;
    }
    let stream = ReaderStream::with_capacity(file.take(len), DOWNLOAD_CHUNK);
    Ok(builder
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

/// A header value from text that may hold anything: bytes a header cannot
/// carry become `_`.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| {
        let clean: String = text
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
            .collect();
        HeaderValue::from_str(&clean)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeBody {
    scope: String,
}

async fn retain(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Result<Json<ScopeBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_ref(&id)?;
    let Json(b) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(views::retain(&st.store, id, &b.scope).await?))
}

async fn scope_refs(
    State(st): State<Shared>,
    axum::extract::Path(scope): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(views::scope_refs(&st.store, &scope)?))
}

async fn scope_list(State(st): State<Shared>) -> Json<Value> {
    Json(views::scope_list(&st.store))
}

async fn release(
    State(st): State<Shared>,
    axum::extract::Path(scope): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(views::release(&st.store, &scope).await?))
}

async fn touch(
    State(st): State<Shared>,
    axum::extract::Path(scope): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(views::touch(&st.store, &scope).await?))
}

async fn gc(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let report = st.store.clean_expired().await;
    st.metrics.sweep(report.as_ref().ok());
    Ok(Json(views::sweep(&report?)))
}

async fn stats(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    Ok(Json(views::stats(&st.store).await?))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    if !st.ready.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    st.store.check_writable()?;
    Ok(Json(json!({"status": "ready"})))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document().to_string(),
    )
        .into_response()
}

async fn metrics(State(st): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&st.store),
    )
        .into_response()
}
