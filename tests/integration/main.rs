//! Black-box tests through the real `ringhub` binary. One test binary (see Cargo.toml) so the
//! build stays fast; one module per area.

// Helpers outside #[test] functions panic on failure on purpose: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod accounts;
mod config_cli;
mod gateway;
mod gateway_limits;
mod history;
mod http;
mod logs;
mod nodes;
mod nodes_accounts;
mod rooms;
mod third_party;
mod tls;
