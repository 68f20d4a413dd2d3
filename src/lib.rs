//! The `sluice` binary's library half: the HTTP server and the CLI's commands, so that
//! end-to-end tests can start a real server in-process.

pub mod cli;
pub mod demo;
pub mod engine;
pub mod server;
