//! The `rdev-api` binary: read the configuration, start logging, run the server.

use clap::Parser;

/// jemalloc, for its sampling heap profiler behind `/debug/pprof/heap`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Profiling on from the start, sampling every 512 KiB allocated on average: cheap enough to
/// leave on in production (the operations runbook pulls heap profiles from live pods).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:19\0";
use rdev_api::adapters::telemetry;
use rdev_api::config::{Config, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init_logging(config.log_format == LogFormat::Json);
    rdev_api::app::run(config).await?;
    Ok(())
}
