//! One module per scenario; adding one is a module and a line in [`ALL`].

use std::future::Future;
use std::pin::Pin;

use anyhow::Result;

use crate::harness::{Ctx, Row};

mod graphile;
mod http;
mod kube;
mod latency;
mod output;
mod queue;
mod ratelimit;
mod sse;
mod webhooks;

pub type Run = for<'a> fn(&'a Ctx) -> Pin<Box<dyn Future<Output = Result<Vec<Row>>> + 'a>>;

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: Run,
}

pub const ALL: &[Scenario] = &[
    http::SCENARIO,
    queue::SCENARIO,
    latency::SCENARIO,
    sse::SCENARIO,
    output::SCENARIO,
    kube::SCENARIO,
    ratelimit::SCENARIO,
    webhooks::SCENARIO,
];
