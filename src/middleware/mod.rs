//! The project's own tower layers. Layers tower and tower-http provide are configured in
//! `crate::stack` directly.

pub mod backend_metrics;
pub mod breaker;
pub mod cache;
pub mod catch_panic;
pub mod compression;
pub mod conditional;
pub mod cors;
pub mod downloads;
pub mod load_shed;
pub mod metrics;
pub mod preflight;
pub mod rate_limit;
pub mod request_id;
pub mod rescue;
pub mod trace;
