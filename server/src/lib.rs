//! The `ringhub` binary's library: configuration (SPEC §1, §9), the command line, access tokens,
//! the HTTP routes and the wiring of `engine` (and, with the accounts issue, `storage`).
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod logging;
pub mod routes;
pub mod serve;
pub mod tokens;
