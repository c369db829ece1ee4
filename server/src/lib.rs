//! The `ringhub` binary's library: configuration (SPEC §1, §9) and the command line. Later
//! issues add the HTTP routes, authentication and the wiring of `engine` and `storage`.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
