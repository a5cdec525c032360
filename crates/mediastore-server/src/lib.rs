//! x
pub mod config;
pub mod units;
