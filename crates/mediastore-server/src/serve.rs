//! `mediastore serve`: opens the store, serves the API until SIGTERM or
//! SIGINT, then shuts down in order: stop accepting, finish requests in
//! flight, stop the cleaner, close the index.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mediastore::{Cleaner, CleanerConfig, DurableStore, Expiry, MediaStore, Quotas};
use tokio::sync::watch;

use crate::app::{self, AppState};
use crate::config::{Config, ConfigError, ScopeAge};
use crate::metrics::Metrics;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened or closed cleanly.
    #[error(transparent)]
    Store(#[from] mediastore::Error),
    /// A listener or a root could not be set up.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

/// Opens the durable store the configuration describes.
pub fn open_store(config: &Config) -> Result<DurableStore, mediastore::Error> {
    let s = &config.store;
    let mut b = DurableStore::builder(&s.data_dir)
        .orphan_grace(s.orphan_grace.0)
        .max_age(config.cleaner.max_age.0)
        .quotas(Quotas {
            max_object_bytes: Some(s.max_object_size.0),
            max_scope_bytes: s.max_scope_bytes.map(|b| b.0),
            max_total_bytes: s.max_total_bytes.map(|b| b.0),
        });
    for root in &s.owned_roots {
        b = b.owned_root(root);
    }
    for (prefix, age) in &config.scopes {
        let expiry = match age {
            ScopeAge::Never => Expiry::Never,
            ScopeAge::After(d) => Expiry::After(d.0),
        };
        b = b.scope_rule(prefix.clone(), expiry);
    }
    b.open()
}

/// Where a running server listens.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// The API.
    pub api: SocketAddr,
    /// `/metrics`, when it has its own listener.
    pub metrics: Option<SocketAddr>,
}

/// Runs the server until SIGTERM or SIGINT (or `stop` turning true).
/// `on_ready` is called once the listeners are bound (with the real ports
/// when 0 was asked for).
pub async fn run(
    config: Config,
    mut stop: watch::Receiver<bool>,
    on_ready: impl FnOnce(Bound),
) -> Result<(), ServeError> {
    let listen = config.listen_addr()?;
    let metrics_listen = config.metrics_addr()?;
    let data_dir = config.store.data_dir.clone();
    let store = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_store(&config))
            .await
            .map_err(|e| io_err("opening the store")(std::io::Error::other(e)))??
    };
    let store = Arc::new(store);
    let report = store.open_report();
    tracing::info!(
        data_dir = %store.data_dir().display(),
        refs = report.refs,
        vanished = report.vanished.len(),
        took_ms = report.took_ms,
        "store open"
    );
    let metrics = Arc::new(Metrics::default());
    let roots: Vec<PathBuf> = config
        .store
        .owned_roots
        .iter()
        .chain(&config.store.shared_roots)
        .cloned()
        .collect();
    let state = Arc::new(
        AppState::new(
            store.clone(),
            metrics.clone(),
            config.server.tokens.clone(),
            &roots,
            config.store.max_object_size.0,
        )
        .map_err(io_err("configured roots"))?,
    );
    let api = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(io_err(format!("listening on {listen}")))?;
    let metrics_listener = match metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io_err(format!("listening on {addr} (metrics)")))?,
        ),
        None => None,
    };
    let bound = Bound {
        api: api.local_addr().map_err(io_err("local address"))?,
        metrics: metrics_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(io_err("local address"))?,
    };

    // One signal for everything that stops.
    let (quit_tx, quit) = watch::channel(false);
    {
        let quit_tx = quit_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            let _ = quit_tx.send(true);
        });
    }
    let cleaner = Cleaner::new(
        store.clone(),
        CleanerConfig {
            enabled: config.cleaner.enabled,
            interval: config.cleaner.interval.0,
        },
    )
    .on_sweep({
        let metrics = metrics.clone();
        move |r| metrics.sweep(r.as_ref().ok())
    });
    if config.cleaner.enabled && !store.expiry_configured() {
        tracing::info!("cleaner idle: no hold can expire (max_age 0 and no scope rule)");
    } else {
        cleaner.start()?;
    }

    let until_quit = |mut q: watch::Receiver<bool>| async move {
        let _ = q.wait_for(|s| *s).await;
    };
    let metrics_server = metrics_listener.map(|l| {
        let router = app::metrics_router(state.clone());
        tokio::spawn(
            axum::serve(l, router)
                .with_graceful_shutdown(until_quit(quit.clone()))
                .into_future(),
        )
    });
    tracing::info!(api = %bound.api, metrics = ?bound.metrics, data_dir = %data_dir.display(), ?config, "listening");
    on_ready(bound);

    let server = axum::serve(api, app::router(state.clone(), bound.metrics.is_none()))
        .with_graceful_shutdown(until_quit(quit.clone()));
    let mut server = std::pin::pin!(server.into_future());
    let grace = config.server.shutdown_timeout.0;
    let served = tokio::select! {
        r = &mut server => r,
        _ = async {
            until_quit(quit.clone()).await;
            state.ready.store(false, Ordering::Release);
            tracing::info!(grace = ?grace, "shutting down: no new connections; finishing requests in flight");
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("requests still in flight after the shutdown timeout; closing anyway");
            Ok(())
        }
    };
    state.ready.store(false, Ordering::Release);
    let _ = quit_tx.send(true);
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    // Waits for a sweep in progress.
    tokio::task::spawn_blocking(move || cleaner.stop())
        .await
        .map_err(|e| io_err("stopping the cleaner")(std::io::Error::other(e)))?;
    served.map_err(io_err("serving"))?;
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .map_err(|e| io_err("closing the store")(std::io::Error::other(e)))??;
    tracing::info!("stopped; index closed");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, never stop on our own.
            std::future::pending::<()>().await
        }
    }
}
