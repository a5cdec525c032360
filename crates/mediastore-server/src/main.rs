//! `mediastore`: the sidecar server and command-line tool.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use mediastore_server::cli::{self, Cli, Command};
use mediastore_server::config::{Config, Overrides};
use mediastore_server::serve;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(args) => serve_main(&cli, args),
        _ => match cli::run(&cli) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mediastore: {}", e.message);
                ExitCode::from(e.exit)
            }
        },
    }
}

fn serve_main(cli: &Cli, args: &cli::ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen.clone(),
        data_dir: cli.data_dir.clone(),
        metrics_listen: args.metrics_listen.clone(),
    };
    let config = match Config::load(cli.config.as_deref(), std::env::vars(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mediastore: {e}");
            return ExitCode::from(2);
        }
    };
    let _flush_logs = mediastore_server::logging::init(&config.log.level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mediastore: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let data_dir = config.store.data_dir.clone();
    let result = runtime.block_on(serve::run(config, stop, |bound| {
        // The one line on stdout: where to connect (scripts and tests read it).
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "mediastore listening on http://{} (data dir {}{})",
            bound.api,
            data_dir.display(),
            bound
                .metrics
                .map(|m| format!(", metrics on http://{m}/metrics"))
                .unwrap_or_default()
        );
        let _ = out.flush();
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mediastore: {e}");
            let in_use = matches!(
                &e,
                serve::ServeError::Store(mediastore::Error::InUse { .. })
            );
            ExitCode::from(if in_use { 6 } else { 1 })
        }
    }
}
