//! The `rdev-api` binary: read the configuration, start logging, run the server.

use clap::Parser;
use rdev_api::adapters::telemetry;
use rdev_api::config::{Config, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init_logging(config.log_format == LogFormat::Json);
    rdev_api::app::run(config).await?;
    Ok(())
}
