//! The binary's subcommands beyond serving: operator tasks straight against the database
//! (`migrate`, `keys`) and a client of a running server (`run`, `commands`, `projects`).
//! [`main`] is the one entry point `main.rs` calls.
//!
//! Exit status of `run` (and `commands logs -f`): the command's own exit code when it exited;
//! 124 timed out, 125 rdev-api itself failed (server unreachable, request refused), 127 the
//! command could not be started, 128 killed by a signal, 129 lost (the replica running it went
//! away), 130 cancelled (Ctrl-C here, or by anyone else).

pub mod client;
pub mod operator;
pub mod remote;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::adapters::telemetry;
use crate::config::{
    Config, DatabaseConfig, LogFormat, ServerConfig, TelemetryConfig, TraceSampler,
    name_values_after_env,
};
pub use crate::domain::error::one_line;

/// The command line. Without a subcommand it serves, taking the server's flags directly (so
/// `rdev-api` with `RDEV_*` variables behaves as `rdev-api serve`).
#[derive(Debug, Parser)]
#[command(
    name = "rdev-api",
    version,
    about = "HTTP gateway for running commands in Kubernetes pods",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<CliCommand>,
    #[command(flatten)]
    pub serve: Box<Config>,
}

impl Cli {
    /// The command line and environment of this process, each value named after its
    /// variable in errors; exits with clap's message when they do not parse.
    pub fn from_env_and_args() -> Self {
        let mut matches = name_values_after_env(Self::command()).get_matches();
        Self::from_arg_matches_mut(&mut matches).unwrap_or_else(|error| error.exit())
    }

    /// [`Cli::from_env_and_args`] for given arguments.
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut matches = name_values_after_env(Self::command()).try_get_matches_from(args)?;
        Self::from_arg_matches_mut(&mut matches)
    }

    /// What to do: the subcommand given, or serving.
    pub fn into_command(self) -> CliCommand {
        self.command.unwrap_or(CliCommand::Serve(self.serve))
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum CliCommand {
    /// Run the server (the default).
    Serve(Box<Config>),
    /// Apply the database migrations, then exit (the server also applies them at start).
    Migrate(DatabaseConfig),
    /// Manage API keys directly in the database (operators; no server needed).
    Keys {
        #[command(flatten)]
        database: DatabaseConfig,
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Run a command on a server and stream its output here; exits with its exit code.
    #[command(after_help = RUN_EXIT_STATUS)]
    Run {
        #[command(flatten)]
        server: ServerConfig,
        #[command(flatten)]
        args: RunArgs,
    },
    /// List, show, cancel and read the output of commands on a server.
    Commands {
        #[command(flatten)]
        server: ServerConfig,
        #[command(subcommand)]
        action: CommandsAction,
    },
    /// List the projects on a server.
    Projects {
        #[command(flatten)]
        server: ServerConfig,
        #[command(subcommand)]
        action: ProjectsAction,
    },
}

const RUN_EXIT_STATUS: &str = "Exit status: the command's exit code; 124 timed out; 125 rdev-api \
     itself failed (server unreachable, request refused); 127 could not be started; 128 killed \
     by a signal; 129 lost (the replica running it went away); 130 cancelled.";

/// Exit status when rdev-api itself fails (as `docker run` and `timeout` do).
pub const EXIT_CLIENT_FAILED: u8 = 125;

/// `rdev-api keys ...`
#[derive(Debug, clap::Subcommand)]
pub enum KeysAction {
    /// Create a key; prints its secret (shown only this once) on stdout.
    Create {
        /// A name people recognise (`ci-bot`).
        #[arg(long)]
        name: String,
        /// Comma-separated: `read`, `execute`, `admin`.
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<String>,
        /// A project the key may use (repeatable; none means all).
        #[arg(long = "project-id", value_name = "ID")]
        project_ids: Vec<uuid::Uuid>,
        /// A CIDR or address the key may be used from (repeatable; none means any).
        #[arg(long = "allowed-ip", value_name = "CIDR")]
        allowed_ips: Vec<String>,
        /// This key's own request rate limit (`100/60s`); without it the server's
        /// `RDEV_RATE_LIMIT` applies.
        #[arg(long, value_name = "N/WINDOW")]
        rate_limit: Option<String>,
        /// Expire after this long (`90d`, `12h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List every key (never their secrets).
    List,
    /// Revoke a key. A running server notices within CACHE_TTL.
    Revoke { id: uuid::Uuid },
}

/// `rdev-api run ...`
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The project, by name or id.
    #[arg(long, short = 'p')]
    pub project: String,
    /// `low`, `normal`, `high` or `critical`.
    #[arg(long, default_value = "normal", value_parser = ["low", "normal", "high", "critical"])]
    pub priority: String,
    /// Stop the command after this long (`30s`, `5m`); the project's default otherwise.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// `NAME=VALUE` added to the command's environment (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// Do not print progress (queue position, start) even on a terminal.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// The command. One argument is a shell script run as given (`'make && make test'`);
    /// several are quoted so that the remote shell sees exactly these arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// `rdev-api commands ...`
#[derive(Debug, clap::Subcommand)]
pub enum CommandsAction {
    /// Recent commands, newest first.
    List {
        /// Only this project (name or id).
        #[arg(long, short = 'p')]
        project: Option<String>,
        /// Only this status (`queued`, `running`, `succeeded`, ...).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One command in detail.
    Show { id: uuid::Uuid },
    /// Cancel a queued or running command.
    Cancel { id: uuid::Uuid },
    /// Its output so far (stdout here, stderr to stderr); `-f` follows until it ends and exits
    /// with its exit status.
    Logs {
        id: uuid::Uuid,
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// `rdev-api projects ...`
#[derive(Debug, clap::Subcommand)]
pub enum ProjectsAction {
    /// Projects this key can see.
    List,
}

fn parse_env_pair(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| format!("`{raw}` is not NAME=VALUE"))
}

/// Closes this process to other processes of its own user: every mode of the binary holds a
/// secret (the server its database URL, bootstrap, audit and stream-token keys; the client its
/// API key), and a local command runs as the server's user unless `RDEV_LOCAL_RUN_AS` says
/// otherwise. A process that is not dumpable has its `/proc/<pid>/environ`, `mem`, `fd` and
/// `maps` owned by root and cannot be ptraced by its user (only by root, or `CAP_SYS_PTRACE`).
/// Commands are not affected: `execve` makes them dumpable again.
pub fn protect_process() {
    // SAFETY: PR_SET_DUMPABLE takes an integer and touches no memory of ours.
    let result = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if result != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot make this process non-dumpable: processes of the same user can read its environment"
        );
    }
}

/// Runs one subcommand to completion and says how the process should exit.
pub async fn main(command: CliCommand) -> ExitCode {
    protect_process();
    match command {
        CliCommand::Serve(config) => {
            let telemetry = match telemetry::init(
                config.telemetry.log_format == LogFormat::Json,
                trace_export(&config.telemetry),
            ) {
                Ok(telemetry) => telemetry,
                Err(error) => {
                    eprintln!(
                        "rdev-api: OTEL_EXPORTER_OTLP_ENDPOINT: {}",
                        one_line(&error)
                    );
                    return ExitCode::FAILURE;
                }
            };
            let served = crate::app::run(*config).await;
            telemetry.shutdown().await;
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("rdev-api: {}", one_line(&error));
                    ExitCode::FAILURE
                }
            }
        }
        CliCommand::Migrate(database) => operator::migrate(&database).await,
        CliCommand::Keys { database, action } => operator::keys(&database, action).await,
        CliCommand::Run { server, args } => remote::run(&server, args).await,
        CliCommand::Commands { server, action } => remote::commands(&server, action).await,
        CliCommand::Projects { server, action } => remote::projects(&server, action).await,
    }
}

/// The span export the `OTEL_*` settings ask for; `None` without an endpoint.
fn trace_export(config: &TelemetryConfig) -> Option<telemetry::TraceExport> {
    use opentelemetry_sdk::trace::Sampler;
    let ratio = config.otel_traces_sampler_arg.unwrap_or(1.0);
    let sampler = match config.otel_traces_sampler {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::Traceidratio => Sampler::TraceIdRatioBased(ratio),
        TraceSampler::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TraceSampler::ParentbasedTraceidratio => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
        }
    };
    Some(telemetry::TraceExport {
        endpoint: config.otlp_endpoint.clone()?,
        service_name: config.otel_service_name.clone(),
        resource_attributes: config.otel_resource_attributes.clone(),
        sampler,
        filter: config.trace_filter.clone(),
    })
}

/// Prints an error and its causes as one line, `rdev-api: what: why: why`.
pub fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("rdev-api: {}", one_line(error));
    ExitCode::from(EXIT_CLIENT_FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subcommand_serves_with_the_server_flags() {
        let cli = Cli::try_parse_args(["rdev-api", "--workers", "7"]).unwrap();
        let CliCommand::Serve(config) = cli.into_command() else {
            panic!("expected serve");
        };
        assert_eq!(config.worker.workers, 7);
        let cli = Cli::try_parse_args(["rdev-api", "serve", "--workers", "3"]).unwrap();
        assert!(matches!(cli.into_command(), CliCommand::Serve(c) if c.worker.workers == 3));
    }

    #[test]
    fn client_commands_parse_the_remote_command_verbatim() {
        let cli = Cli::try_parse_args([
            "rdev-api",
            "run",
            "--api-key",
            "k",
            "--project",
            "demo",
            "--priority",
            "high",
            "--",
            "ls",
            "-la",
            "my dir",
        ])
        .unwrap();
        let CliCommand::Run { server, args } = cli.into_command() else {
            panic!("expected run");
        };
        assert_eq!(server.url, "http://127.0.0.1:8080");
        assert_eq!(args.command, ["ls", "-la", "my dir"]);
        assert!(
            Cli::try_parse_args([
                "rdev-api",
                "run",
                "--api-key",
                "k",
                "--url",
                "ftp://x",
                "--project",
                "p",
                "--",
                "true"
            ])
            .is_err()
        );
    }

    #[test]
    fn env_pairs_need_a_name_and_an_equals_sign() {
        assert_eq!(
            parse_env_pair("A=b=c"),
            Ok(("A".to_owned(), "b=c".to_owned()))
        );
        assert!(parse_env_pair("=x").is_err());
        assert!(parse_env_pair("novalue").is_err());
    }
}
