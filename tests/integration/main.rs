//! Black-box tests through the real `ringhub` binary. One test binary (see Cargo.toml) so the
//! build stays fast; one module per area.

mod config_cli;
