//! The command-line tool: every command works against a running server
//! (`--server URL`, token from `MEDIASTORE_TOKEN`) or directly on a data
//! dir (`--data-dir`, the default). Both print the same JSON with `--json`.
//!
//! Exit codes: see [`EXIT_CODES`].

use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use mediastore::{DurableStore, MediaMeta, MediaRef, MediaStore, PutLimits};
use serde_json::{Value, json};

use crate::config::{self, Config, Overrides};
use crate::error::ApiError;
use crate::views;

/// What the exit status means, for scripts.
pub const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  the store or server failed (I/O error, index unusable)
  2  usage error (bad flags or arguments)
  3  not found: unknown ref, vanished file, unknown route
  4  refused: invalid ref, scope or policy, outside the roots, too large, quota full
  5  unauthorized: missing or wrong token (set MEDIASTORE_TOKEN)
  6  unreachable: no server at --server, or the data dir is in use by a server";

/// `mediastore`: the media store for AI-agent gateways.
#[derive(Debug, Parser)]
#[command(name = "mediastore", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Talk to a running server at this URL (e.g. http://127.0.0.1:8765)
    /// instead of opening the data dir. The token comes from
    /// MEDIASTORE_TOKEN.
    #[arg(long, global = true, env = "MEDIASTORE_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The data dir (default ./mediastore-data, or store.data_dir of the
    /// config).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML config file (see `mediastore serve --help` for every key).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print results as JSON (one object) for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API until SIGTERM or SIGINT.
    #[command(after_long_help = config::EXAMPLE)]
    Serve(ServeArgs),
    /// Store a file under a scope (copied into the managed dir); prints its ref.
    Put {
        /// The file to store ("-" reads standard input).
        file: PathBuf,
        /// The scope that holds the new ref.
        #[arg(long)]
        scope: String,
        /// Filename to record (default: the file's name).
        #[arg(long)]
        filename: Option<String>,
        /// Declared content type (sniffed from the bytes when they say more).
        #[arg(long)]
        content_type: Option<String>,
        /// Where the media came from (default: cli).
        #[arg(long)]
        source: Option<String>,
    },
    /// Write a ref's bytes to a file (-o) or standard output.
    Get {
        /// The ref (media://UUID, or the bare UUID).
        reference: String,
        /// Output file (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Show a ref's metadata and the scopes holding it.
    Meta {
        /// The ref.
        reference: String,
    },
    /// List the refs of a scope, or every scope with its hold count.
    Ls {
        /// The scope to list.
        #[arg(long)]
        scope: Option<String>,
    },
    /// Add a scope as a holder of a ref (or renew its hold).
    Retain {
        /// The ref.
        reference: String,
        /// The scope.
        scope: String,
    },
    /// Drop every hold of a scope; files that lose their last ref are deleted.
    Release {
        /// The scope.
        scope: String,
    },
    /// Renew every hold of a scope.
    Touch {
        /// The scope.
        scope: String,
    },
    /// Sweep expired holds now.
    Gc,
    /// Show counters.
    Stats,
}

/// `mediastore serve` flags (with the global `--config` and `--data-dir`).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (server.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Separate address for /metrics (server.metrics_listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// A failed command: what to print and the exit status.
#[derive(Debug)]
pub struct CliError {
    /// Exit status (see [`EXIT_CODES`]).
    pub exit: u8,
    /// The message.
    pub message: String,
}

impl CliError {
    fn new(exit: u8, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
        }
    }

    fn usage(message: impl Into<String>) -> Self {
        Self::new(2, message)
    }

    fn io(context: &str, e: io::Error) -> Self {
        Self::new(1, format!("{context}: {e}"))
    }

    /// From an HTTP status and the API's error body (or a local error
    /// mapped through the same table).
    fn from_status(status: u16, code: &str, message: &str) -> Self {
        let exit = match status {
            401 => 5,
            404 | 410 => 3,
            503 if code == "storage_unavailable" && message.contains("already in use") => 6,
            400..=499 | 507 => 4,
            _ => 1,
        };
        let mut message = message.to_string();
        if exit == 6 {
            message.push_str(" (a server holds it: use --server URL)");
        }
        Self::new(exit, message)
    }
}

impl From<mediastore::Error> for CliError {
    fn from(e: mediastore::Error) -> Self {
        let api = ApiError::from(e);
        Self::from_status(api.status.as_u16(), api.code, &api.message)
    }
}

/// Runs a command other than `serve`; prints its result on stdout.
pub fn run(cli: &Cli) -> Result<(), CliError> {
    let backend = if let Some(url) = &cli.server {
        Backend::Remote(Remote::new(url))
    } else {
        let overrides = Overrides {
            data_dir: cli.data_dir.clone(),
            ..Overrides::default()
        };
        let config = Config::load(cli.config.as_deref(), std::env::vars(), &overrides)
            .map_err(|e| CliError::usage(e.to_string()))?;
        Backend::Local(Box::new(Local::open(&config)?))
    };
    let result = execute(cli, &backend);
    // Closed whatever happened, so its own error (a failed final commit)
    // is not lost to a drop.
    if let Backend::Local(l) = backend {
        l.close()?;
    }
    result
}

fn execute(cli: &Cli, backend: &Backend) -> Result<(), CliError> {
    let out = match &cli.command {
        Command::Serve(_) => unreachable!("serve is run by main"),
        Command::Put {
            file,
            scope,
            filename,
            content_type,
            source,
        } => {
            let name = filename.clone().unwrap_or_else(|| {
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|n| n != "-")
                    .unwrap_or_default()
            });
            let meta = MediaMeta::new(
                name,
                content_type.clone().unwrap_or_default(),
                source.clone().unwrap_or_else(|| "cli".into()),
            );
            backend.put(file, &meta, scope)?
        }
        Command::Get { reference, output } => {
            if cli.json && output.is_none() {
                return Err(CliError::usage(
                    "--json with get needs -o FILE (the bytes go to the file)",
                ));
            }
            let id = parse_ref(reference)?;
            let bytes = backend.get(id, output.as_deref())?;
            if cli.json {
                println!(
                    "{}",
                    json!({"id": id.to_string(), "bytes": bytes, "output": output})
                );
            }
            return Ok(());
        }
        Command::Meta { reference } => backend.meta(parse_ref(reference)?)?,
        Command::Ls { scope } => backend.ls(scope.as_deref())?,
        Command::Retain { reference, scope } => backend.retain(parse_ref(reference)?, scope)?,
        Command::Release { scope } => backend.release(scope)?,
        Command::Touch { scope } => backend.touch(scope)?,
        Command::Gc => backend.gc()?,
        Command::Stats => backend.stats()?,
    };
    print(cli.json, &out, |v| human(&cli.command, v));
    Ok(())
}

fn print(as_json: bool, v: &Value, human: impl Fn(&Value) -> String) {
    let text = if as_json { v.to_string() } else { human(v) };
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

/// The human form of a command's result.
fn human(command: &Command, v: &Value) -> String {
    let field = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    match command {
        // Just the ref, for scripts.
        Command::Put { .. } => field("id"),
        Command::Meta { .. } | Command::Retain { .. } => {
            let mut lines: Vec<String> = [
                "id",
                "filename",
                "content_type",
                "size",
                "sha256",
                "source",
                "policy",
                "path",
                "stored_at",
            ]
            .iter()
            .map(|k| format!("{k:<13}{}", field(k)))
            .collect();
            if let Some(scopes) = v["scopes"].as_array() {
                for s in scopes {
                    lines.push(format!(
                        "{:<13}{} (expires {})",
                        "held by",
                        s["scope"].as_str().unwrap_or(""),
                        s["expires_at"].as_str().unwrap_or("never")
                    ));
                }
            } else if v.get("scope").is_some() {
                lines.push(format!(
                    "{:<13}{} (expires {})",
                    "held by",
                    field("scope"),
                    v["expires_at"].as_str().unwrap_or("never")
                ));
            }
            lines.join("\n")
        }
        Command::Ls { scope: Some(_) } => v["refs"]
            .as_array()
            .map(|refs| {
                refs.iter()
                    .map(|r| {
                        format!(
                            "{}  {:>10}  {}  {}",
                            r["id"].as_str().unwrap_or(""),
                            r["size"],
                            r["content_type"].as_str().unwrap_or(""),
                            r["filename"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
        Command::Ls { scope: None } => v["scopes"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|s| format!("{}  {}", s["scope"].as_str().unwrap_or(""), s["holds"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
        Command::Release { .. } => format!(
            "released {} refs; {} removed; {} files deleted ({} bytes); {} failures",
            field("refs_released"),
            field("refs_removed"),
            field("files_deleted"),
            field("bytes_freed"),
            v["failures"].as_array().map_or(0, Vec::len)
        ),
        Command::Touch { .. } => format!("renewed {} holds of {}", field("holds"), field("scope")),
        Command::Gc => format!(
            "{} refs expired; {} files deleted ({} bytes); {} failures",
            field("refs_expired"),
            field("files_deleted"),
            field("bytes_freed"),
            v["failures"].as_array().map_or(0, Vec::len)
        ),
        _ => v
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, val)| format!("{k:<18}{val}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
    }
}

fn parse_ref(text: &str) -> Result<MediaRef, CliError> {
    MediaRef::parse_lenient(text.trim()).map_err(CliError::from)
}

enum Backend {
    Remote(Remote),
    Local(Box<Local>),
}

impl Backend {
    fn put(&self, file: &Path, meta: &MediaMeta, scope: &str) -> Result<Value, CliError> {
        match self {
            Self::Remote(r) => r.put(file, meta, scope),
            Self::Local(l) => l.put(file, meta, scope),
        }
    }

    fn get(&self, id: MediaRef, output: Option<&Path>) -> Result<u64, CliError> {
        let (reader, size): (Box<dyn Read>, Option<u64>) = match self {
            Self::Remote(r) => r.download(id)?,
            Self::Local(l) => {
                let (file, _) = l.block(l.store.open(id))?;
                let size = file.metadata().ok().map(|m| m.len());
                (Box::new(file), size)
            }
        };
        copy_out(reader, size, output)
    }

    fn meta(&self, id: MediaRef) -> Result<Value, CliError> {
        match self {
            Self::Remote(r) => r.call("GET", &format!("/v1/media/{}", id.uuid()), None),
            Self::Local(l) => Ok(views::media(&l.store, id)?),
        }
    }

    fn ls(&self, scope: Option<&str>) -> Result<Value, CliError> {
        match (self, scope) {
            (Self::Remote(r), Some(s)) => r.call("GET", &format!("/v1/scopes/{}", enc(s)), None),
            (Self::Remote(r), None) => r.call("GET", "/v1/scopes", None),
            (Self::Local(l), Some(s)) => Ok(views::scope_refs(&l.store, s)?),
            (Self::Local(l), None) => Ok(views::scope_list(&l.store)),
        }
    }

    fn retain(&self, id: MediaRef, scope: &str) -> Result<Value, CliError> {
        match self {
            Self::Remote(r) => r.call(
                "POST",
                &format!("/v1/media/{}/retain", id.uuid()),
                Some(json!({ "scope": scope })),
            ),
            Self::Local(l) => l.block(views::retain(&l.store, id, scope)),
        }
    }

    fn release(&self, scope: &str) -> Result<Value, CliError> {
        match self {
            Self::Remote(r) => r.call("DELETE", &format!("/v1/scopes/{}", enc(scope)), None),
            Self::Local(l) => l.block(views::release(&l.store, scope)),
        }
    }

    fn touch(&self, scope: &str) -> Result<Value, CliError> {
        match self {
            Self::Remote(r) => r.call("POST", &format!("/v1/scopes/{}/touch", enc(scope)), None),
            Self::Local(l) => l.block(views::touch(&l.store, scope)),
        }
    }

    fn gc(&self) -> Result<Value, CliError> {
        match self {
            Self::Remote(r) => r.call("POST", "/v1/gc", None),
            Self::Local(l) => Ok(views::sweep(&l.block(l.store.clean_expired())?)),
        }
    }

    fn stats(&self) -> Result<Value, CliError> {
        match self {
            Self::Remote(r) => r.call("GET", "/v1/stats", None),
            Self::Local(l) => l.block(views::stats(&l.store)),
        }
    }
}

/// Percent-encodes a path segment (a scope).
fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Copies a download to `output` (or stdout), with a progress bar on a
/// terminal for big files. A failed copy leaves no partial output file.
fn copy_out(
    mut reader: Box<dyn Read>,
    size: Option<u64>,
    output: Option<&Path>,
) -> Result<u64, CliError> {
    let mut sink: Box<dyn Write> = match output {
        Some(p) => Box::new(io::BufWriter::new(
            std::fs::File::create(p)
                .map_err(|e| CliError::io(&format!("creating {}", p.display()), e))?,
        )),
        None => Box::new(io::stdout().lock()),
    };
    let show = io::stderr().is_terminal() && size.is_some_and(|s| s >= 8 << 20);
    let mut progress = Progress::new(size, show);
    let mut buf = vec![0u8; 256 << 10];
    let result = (|| -> io::Result<u64> {
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sink.write_all(&buf[..n])?;
            progress.add(n as u64);
        }
        sink.flush()?;
        Ok(progress.done)
    })();
    progress.finish();
    match result {
        Ok(n) => Ok(n),
        Err(e) => {
            if let Some(p) = output {
                let _ = std::fs::remove_file(p);
            }
            Err(CliError::io("downloading", e))
        }
    }
}

/// A one-line progress bar on stderr.
struct Progress {
    total: Option<u64>,
    done: u64,
    started: Instant,
    shown: Instant,
    on: bool,
}

impl Progress {
    fn new(total: Option<u64>, on: bool) -> Self {
        let now = Instant::now();
        Self {
            total,
            done: 0,
            started: now,
            shown: now,
            on,
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.on && self.shown.elapsed() >= Duration::from_millis(100) {
            self.shown = Instant::now();
            self.draw();
        }
    }

    fn draw(&self) {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let rate = mib(self.done) / self.started.elapsed().as_secs_f64().max(1e-3);
        let total = self.total.unwrap_or(0).max(1);
        eprint!(
            "\r{:>3}%  {:.1} / {:.1} MiB  {:.1} MiB/s ",
            self.done * 100 / total,
            mib(self.done),
            mib(total),
            rate
        );
    }

    fn finish(&self) {
        if self.on {
            self.draw();
            eprintln!();
        }
    }
}

/// A running server.
struct Remote {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Remote {
    fn new(url: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            agent,
            base: url.trim_end_matches('/').to_string(),
            token: std::env::var("MEDIASTORE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        }
    }

    fn auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => r.header("Authorization", format!("Bearer {t}")),
            None => r,
        }
    }

    fn unreachable(&self, e: ureq::Error) -> CliError {
        CliError::new(6, format!("cannot reach the server at {}: {e}", self.base))
    }

    /// Turns an error response into the exit status it stands for.
    fn failure(status: u16, body: &str) -> CliError {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let code = v["error"]["code"].as_str().unwrap_or("error");
        let message = v["error"]["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("HTTP {status}: {body}"));
        CliError::from_status(status, code, &message)
    }

    fn finish(
        &self,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, CliError> {
        let mut resp = resp.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        if status >= 400 {
            return Err(Self::failure(status, &body));
        }
        serde_json::from_str(&body).map_err(|e| {
            CliError::new(
                1,
                format!("the server answered something other than JSON: {e}"),
            )
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let resp = match method {
            "GET" => self.auth(self.agent.get(&url)).call(),
            "DELETE" => self.auth(self.agent.delete(&url)).call(),
            _ => self
                .auth(self.agent.post(&url))
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_else(|| json!({})).to_string()),
        };
        self.finish(resp)
    }

    fn put(&self, file: &Path, meta: &MediaMeta, scope: &str) -> Result<Value, CliError> {
        let url = format!(
            "{}/v1/media?scope={}&source={}",
            self.base,
            enc(scope),
            enc(&meta.source)
        );
        let mut req = self
            .auth(self.agent.post(&url))
            .header("X-Media-Filename", enc(&meta.filename));
        if !meta.content_type.is_empty() {
            req = req.header("Content-Type", &meta.content_type);
        }
        let resp = if file == Path::new("-") {
            let mut stdin = io::stdin().lock();
            req.send(ureq::SendBody::from_reader(&mut stdin))
        } else {
            let f = std::fs::File::open(file)
                .map_err(|e| CliError::new(4, format!("opening {}: {e}", file.display())))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            req.header("Content-Length", len.to_string()).send(f)
        };
        self.finish(resp)
    }

    fn download(&self, id: MediaRef) -> Result<(Box<dyn Read>, Option<u64>), CliError> {
        let url = format!("{}/v1/media/{}/content", self.base, id.uuid());
        let mut resp = self
            .auth(self.agent.get(&url))
            .call()
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            return Err(Self::failure(status, &body));
        }
        let size = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        Ok((Box::new(reader), size))
    }
}

/// A data dir opened in this process.
struct Local {
    store: DurableStore,
    rt: tokio::runtime::Runtime,
    max_object: u64,
}

impl Local {
    fn open(config: &Config) -> Result<Self, CliError> {
        let store = crate::serve::open_store(config)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::io("starting a runtime", e))?;
        Ok(Self {
            store,
            rt,
            max_object: config.store.max_object_size.0,
        })
    }

    fn block<T>(
        &self,
        fut: impl std::future::Future<Output = mediastore::Result<T>>,
    ) -> Result<T, CliError> {
        self.rt.block_on(fut).map_err(CliError::from)
    }

    fn put(&self, file: &Path, meta: &MediaMeta, scope: &str) -> Result<Value, CliError> {
        let limits = PutLimits {
            max_bytes: Some(self.max_object),
        };
        let report = if file == Path::new("-") {
            self.block(self.store.put(tokio::io::stdin(), meta, scope, &limits))?
        } else {
            let f = std::fs::File::open(file)
                .map_err(|e| CliError::new(4, format!("opening {}: {e}", file.display())))?;
            let f = self.rt.block_on(async { tokio::fs::File::from_std(f) });
            self.block(self.store.put(f, meta, scope, &limits))?
        };
        let mut v = views::in_scope(&self.store, report.media_ref, scope)?;
        v["deduplicated"] = json!(report.deduplicated);
        Ok(v)
    }

    fn close(self) -> Result<(), CliError> {
        self.store.close().map_err(CliError::from)
    }
}
