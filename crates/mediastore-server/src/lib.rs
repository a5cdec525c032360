//! mediastore as a sidecar: `mediastore serve` puts the durable media store
//! behind an HTTP/JSON API for gateways written in any language, and the
//! same binary is a command-line tool against a running server or a data
//! dir.
//!
//! The pieces are usable on their own: [`config`] loads and checks the
//! configuration, [`serve::run`] runs the server, [`app::router`] is the
//! axum router (to mount inside another server), [`cli`] is the
//! command-line tool.
//!
//! ```
//! use mediastore_server::config::{Config, Overrides};
//!
//! // Defaults, then the environment, then flags.
//! let env = [("MEDIASTORE__CLEANER__MAX_AGE".to_string(), "7d".to_string())];
//! let flags = Overrides {
//!     listen: Some("127.0.0.1:9000".into()),
//!     ..Overrides::default()
//! };
//! let config = Config::load(None, env, &flags).unwrap();
//! assert_eq!(config.server.listen, "127.0.0.1:9000");
//! assert_eq!(config.cleaner.max_age.0.as_secs(), 7 * 24 * 3600);
//!
//! // A public address without a token is refused.
//! let public = Overrides {
//!     listen: Some("0.0.0.0:9000".into()),
//!     ..Overrides::default()
//! };
//! assert!(Config::load(None, Vec::new(), &public).is_err());
//! ```

pub mod app;
pub mod cli;
pub mod config;
pub mod content;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod units;
pub mod views;
