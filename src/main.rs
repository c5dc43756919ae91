//! The `rdev-api` binary: parse the command line, then serve (the default) or run a subcommand.

use std::process::ExitCode;

use rdev_api::cli::Cli;

/// jemalloc, for its sampling heap profiler behind `/debug/pprof/heap`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Profiling on from the start, sampling every 512 KiB allocated on average: cheap enough to
/// leave on in production (the operations runbook pulls heap profiles from live pods).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

#[tokio::main]
async fn main() -> ExitCode {
    rdev_api::cli::main(Cli::from_env_and_args().into_command()).await
}
