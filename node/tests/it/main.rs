//! The node's integration tests, one binary: the CLI as a user runs it, real daemons meshing over
//! loopback, and the NAT test in network namespaces. Real processes, real sockets, no mocks.
#![allow(clippy::unwrap_used)]
#[path = "../common/adapter.rs"]
mod adapter;
mod cli;
mod daemon;
mod demo;
mod gguf;
mod harness;
mod hostile;
mod jobs;
mod mesh;
mod nat;
mod serve;
mod serve_route;
mod state;
