//! The `ringhub` binary's library: configuration (SPEC §1, §9), the command line, access tokens,
//! the accounts service, the HTTP routes and the wiring of `engine` and `storage`.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod announce;
pub mod api_error;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod fingerprints;
pub mod limiter;
pub mod logging;
pub mod observe;
pub mod origins;
pub mod pool;
pub mod revocation;
pub mod rooms;
pub mod routes;
pub mod serve;
pub mod tls;
pub mod tokens;
