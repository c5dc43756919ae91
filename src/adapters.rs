//! Technology behind the ports. Each adapter depends on the domain and the ports only (the HTTP
//! adapter also on the services); `app.rs` is the one place that puts them together.

pub mod bus;
pub mod cache;
pub mod http;
pub mod kube;
pub mod local;
pub mod memory;
pub mod pipe;
pub mod postgres;
pub mod sql;
pub mod sqlite;
pub mod telemetry;
pub mod webhook;
