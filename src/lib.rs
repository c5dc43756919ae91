//! rdev-api: an HTTP gateway for running shell commands in Kubernetes pods (or local processes).
//!
//! The crate is laid out as a hexagon: [`domain`] holds the rules, [`ports`] the capabilities the
//! use cases in [`services`] need, [`adapters`] the technology behind them, and [`app`] wires one to
//! the other. Dependencies only point inward. [`cli`] is the command line beyond serving.

pub mod adapters;
pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod ports;
pub mod resilience;
pub mod services;
