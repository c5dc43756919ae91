//! The client subcommands: `run`, `commands list|show|cancel|logs`, `projects list`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use uuid::Uuid;

use super::client::{ApiClient, ClientError, CommandView, Page};
use super::{CommandsAction, ProjectsAction, RunArgs, fail};
use crate::config::ServerConfig;
use crate::resilience::Backoff;

/// A stream that says nothing this long (the server sends keep-alives every 15 s by default)
/// is taken as dropped.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// How long to keep trying to get a dropped stream back.
const RECONNECT_GIVE_UP: Duration = Duration::from_secs(120);
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Waits between reconnects while the server cannot be reached.
const RECONNECT: Backoff = Backoff {
    first: FIRST_RETRY,
    max: Duration::from_secs(5),
};
/// How often the queue position is asked for while the command waits.
const POSITION_POLL: Duration = Duration::from_secs(2);

/// Exit statuses for endings that have no exit code of their own (see the module docs).
const EXIT_TIMED_OUT: u8 = 124;
const EXIT_START_FAILED: u8 = 127;
const EXIT_SIGNALLED: u8 = 128;
const EXIT_LOST: u8 = 129;
const EXIT_CANCELLED: u8 = 130;

/// The `end` event of a command's stream.
#[derive(Debug, Clone, Deserialize)]
pub struct Ending {
    pub status: String,
    pub exit_code: Option<i32>,
    pub termination_reason: Option<String>,
    pub error: Option<String>,
}

/// The process exit status that stands for how a command ended.
pub fn exit_status(ending: &Ending) -> u8 {
    match (ending.status.as_str(), ending.termination_reason.as_deref()) {
        ("succeeded", _) => 0,
        ("timed_out", _) => EXIT_TIMED_OUT,
        ("cancelled", _) => EXIT_CANCELLED,
        ("lost", _) => EXIT_LOST,
        (_, Some("start_failed")) => EXIT_START_FAILED,
        // A shell keeps only the low 8 bits of an exit code; a failure must not read as 0.
        (_, _) => match ending.exit_code {
            Some(code) if code & 0xff != 0 => (code & 0xff) as u8,
            Some(_) => 1,
            None => EXIT_SIGNALLED,
        },
    }
}

/// Where progress notes go: stderr, when it is a terminal and not silenced.
struct Notes {
    progress: bool,
}

impl Notes {
    fn progress(&self, message: &str) {
        if self.progress {
            eprintln!("rdev-api: {message}");
        }
    }

    /// Things a script reading stderr should know about too (a dropped connection).
    fn warn(&self, message: &str) {
        eprintln!("rdev-api: {message}");
    }
}

/// Follows command `id` from output sequence `after` to its end (or, with `until_seq`, to that
/// output), writing stdout and stderr here. Resumes after a dropped connection from the last
/// sequence number written, so nothing is lost or written twice.
async fn follow(
    client: &ApiClient,
    id: Uuid,
    after: i64,
    until_seq: Option<i64>,
    notes: &Notes,
) -> Result<Option<Ending>, ClientError> {
    Follower {
        client,
        id,
        after,
        until_seq,
        notes,
        queued: false,
        position: None,
    }
    .run()
    .await
}

struct Follower<'a> {
    client: &'a ApiClient,
    id: Uuid,
    /// The last output sequence number written.
    after: i64,
    until_seq: Option<i64>,
    notes: &'a Notes,
    queued: bool,
    position: Option<u64>,
}

/// How one connection's stream stopped.
enum Stopped {
    /// The command ended (`end` event).
    Ended(Ending),
    /// The output asked for has all been written.
    CaughtUp,
    /// The connection broke, or the stream went silent or skipped output: resume.
    Dropped(String),
}

impl Follower<'_> {
    async fn run(mut self) -> Result<Option<Ending>, ClientError> {
        let mut failures = 0;
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            if self.caught_up() {
                return Ok(None);
            }
            let events = match self.client.events(self.id, self.after).await {
                Ok(events) => events,
                Err(error) if error.is_transient() => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > RECONNECT_GIVE_UP {
                        return Err(error);
                    }
                    failures += 1;
                    tokio::time::sleep(RECONNECT.delay(failures)).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            if failing_since.take().is_some() {
                self.notes.warn(&format!(
                    "reconnected; resuming after output {}",
                    self.after
                ));
            }
            failures = 0;
            match self.read(events).await? {
                Stopped::Ended(ending) => return Ok(Some(ending)),
                Stopped::CaughtUp => return Ok(None),
                Stopped::Dropped(why) => {
                    self.notes.warn(&format!(
                        "connection lost ({why}); resuming after output {}",
                        self.after
                    ));
                    failing_since.get_or_insert_with(tokio::time::Instant::now);
                    tokio::time::sleep(FIRST_RETRY).await;
                }
            }
        }
    }

    fn caught_up(&self) -> bool {
        self.until_seq.is_some_and(|last| self.after >= last)
    }

    /// Reads one connection's events until the stream stops.
    async fn read(
        &mut self,
        mut events: impl futures::Stream<Item = Result<eventsource_stream::Event, String>> + Unpin,
    ) -> Result<Stopped, ClientError> {
        let mut poll = tokio::time::interval(POSITION_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(SILENCE_LIMIT, events.next()) => next,
                _ = poll.tick(), if self.queued => {
                    self.report_position().await;
                    continue;
                }
            };
            let event = match next {
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(why))) => return Ok(Stopped::Dropped(why)),
                Ok(None) => return Ok(Stopped::Dropped("the server closed the stream".into())),
                Err(_) => {
                    return Ok(Stopped::Dropped(format!(
                        "nothing heard for {} s",
                        SILENCE_LIMIT.as_secs()
                    )));
                }
            };
            if let Some(stopped) = self.on_event(event)? {
                return Ok(stopped);
            }
        }
    }

    fn on_event(
        &mut self,
        event: eventsource_stream::Event,
    ) -> Result<Option<Stopped>, ClientError> {
        match event.event.as_str() {
            "output" => {
                let Ok(seq) = event.id.parse::<i64>() else {
                    return Ok(None);
                };
                if seq <= self.after {
                    return Ok(None);
                }
                if seq != self.after + 1 {
                    return Ok(Some(Stopped::Dropped(format!(
                        "output {} was skipped",
                        self.after + 1
                    ))));
                }
                write_output(&event.data);
                self.after = seq;
                if self.caught_up() {
                    return Ok(Some(Stopped::CaughtUp));
                }
            }
            "status" => {
                let status: serde_json::Value =
                    serde_json::from_str(&event.data).unwrap_or_default();
                let was_queued = self.queued;
                self.queued = status["status"] == "queued";
                if self.queued {
                    self.position = status["position"].as_u64();
                    self.notes.progress(&format!(
                        "command {} queued, position {}",
                        self.id,
                        self.position.unwrap_or(0)
                    ));
                } else if was_queued && status["status"] == "running" {
                    self.notes.progress("running");
                }
            }
            "truncated" => self
                .notes
                .warn("output reached the server's stored-output cap; the rest is not shown"),
            "end" => {
                let ending =
                    serde_json::from_str(&event.data).map_err(|_| ClientError::Server {
                        status: reqwest::StatusCode::BAD_GATEWAY,
                        title: "Malformed end event".into(),
                        detail: Some(event.data.clone()),
                        fields: vec![],
                    })?;
                return Ok(Some(Stopped::Ended(ending)));
            }
            _ => {}
        }
        Ok(None)
    }

    /// The event stream tells the position once; it changes as commands ahead start.
    async fn report_position(&mut self) {
        if let Ok(command) = self.client.command(self.id).await
            && command.status == "queued"
            && command.position != self.position
        {
            self.position = command.position;
            self.notes
                .progress(&format!("queued, position {}", self.position.unwrap_or(0)));
        }
    }
}

fn write_output(data: &str) {
    #[derive(Deserialize)]
    struct Chunk<'a> {
        stream: &'a str,
        #[serde(borrow)]
        data: std::borrow::Cow<'a, str>,
    }
    let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(data) else {
        return;
    };
    // A closed pipe (`| head`) is not an error worth reporting.
    if chunk.stream == "stderr" {
        let mut err = std::io::stderr().lock();
        let _ = err
            .write_all(chunk.data.as_bytes())
            .and_then(|()| err.flush());
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out
            .write_all(chunk.data.as_bytes())
            .and_then(|()| out.flush());
    }
}

/// The text sent to the server's `sh -c`: one argument as the script it is, several quoted.
fn shell_command(args: &[String]) -> Result<String, ClientError> {
    if let [script] = args {
        return Ok(script.clone());
    }
    shlex::try_join(args.iter().map(String::as_str)).map_err(|_| ClientError::Server {
        status: reqwest::StatusCode::UNPROCESSABLE_ENTITY,
        title: "Invalid command".into(),
        detail: Some("an argument contains a NUL byte".into()),
        fields: vec![],
    })
}

fn ending_line(ending: &Ending) -> String {
    let mut line = ending.status.clone();
    if let Some(code) = ending.exit_code {
        line.push_str(&format!(", exit code {code}"));
    }
    if let Some(error) = &ending.error {
        line.push_str(&format!(": {error}"));
    }
    line
}

/// `rdev-api run`: submit, stream, exit with the command's status. Ctrl-C cancels the command
/// on the server and waits for it to end; a second Ctrl-C stops waiting.
pub async fn run(server: &ServerConfig, args: RunArgs) -> ExitCode {
    // Before anything is submitted, so that an early Ctrl-C cancels instead of killing us.
    let mut interrupts = match signal(SignalKind::interrupt()) {
        Ok(interrupts) => interrupts,
        Err(error) => return fail(&error),
    };
    let notes = Notes {
        progress: !args.quiet && std::io::stderr().is_terminal(),
    };
    let client = match ApiClient::new(server) {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let submitted = async {
        let project = client.resolve_project(&args.project).await?;
        let mut body = json!({
            "command": shell_command(&args.command)?,
            "priority": args.priority,
            "env": args.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        });
        if let Some(timeout) = args.timeout {
            body["timeout_secs"] = json!(timeout.as_secs().max(1));
        }
        client
            .post::<CommandView>(&format!("/projects/{}/commands", project.id), &body)
            .await
    };
    let command = tokio::select! {
        command = submitted => match command {
            Ok(command) => command,
            Err(error) => return fail(&error),
        },
        _ = interrupts.recv() => return ExitCode::from(EXIT_CANCELLED),
    };
    let id = command.id;
    let following = follow(&client, id, 0, None, &notes);
    tokio::pin!(following);
    let mut cancelling = false;
    loop {
        tokio::select! {
            ended = &mut following => return match ended {
                Ok(Some(ending)) => {
                    if ending.status != "succeeded" {
                        notes.progress(&format!("command {id} {}", ending_line(&ending)));
                    }
                    ExitCode::from(exit_status(&ending))
                }
                Ok(None) => ExitCode::SUCCESS,
                Err(error) => fail(&error),
            },
            _ = interrupts.recv() => {
                if cancelling {
                    notes.warn(&format!("stopped waiting; command {id} is being cancelled"));
                    return ExitCode::from(EXIT_CANCELLED);
                }
                cancelling = true;
                notes.warn(&format!("cancelling command {id} (Ctrl-C again to stop waiting)"));
                match client.cancel(id).await {
                    Ok(_) => {}
                    // Already ended: the stream tells how.
                    Err(error) if error.status() == Some(reqwest::StatusCode::CONFLICT) => {}
                    Err(error) => notes.warn(&format!("could not cancel: {}", super::one_line(&error))),
                }
            }
        }
    }
}

pub async fn commands(server: &ServerConfig, action: CommandsAction) -> ExitCode {
    let client = match ApiClient::new(server) {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let done = match action {
        CommandsAction::List {
            project,
            status,
            limit,
        } => list_commands(&client, project, status, limit).await,
        CommandsAction::Show { id } => show_command(&client, id).await,
        CommandsAction::Cancel { id } => client.cancel(id).await.map(|command| {
            println!("{} {}", command.id, command.status);
            ExitCode::SUCCESS
        }),
        CommandsAction::Logs { id, follow: live } => logs(&client, id, live).await,
    };
    done.unwrap_or_else(|error| fail(&error))
}

async fn list_commands(
    client: &ApiClient,
    project: Option<String>,
    status: Option<String>,
    limit: u32,
) -> Result<ExitCode, ClientError> {
    let projects = client.projects().await?;
    let mut query = vec![format!("limit={limit}")];
    if let Some(project) = project {
        query.push(format!(
            "project_id={}",
            client.resolve_project(&project).await?.id
        ));
    }
    if let Some(status) = status {
        query.push(format!("status={status}"));
    }
    let page: Page<CommandView> = client
        .get(&format!("/commands?{}", query.join("&")))
        .await?;
    let rows = page.items.iter().map(|c| {
        let project = projects
            .iter()
            .find(|p| p.id == c.project_id)
            .map_or_else(|| c.project_id.to_string(), |p| p.name.clone());
        vec![
            c.id.to_string(),
            c.status.clone(),
            c.exit_code.map(|e| e.to_string()).unwrap_or_default(),
            project,
            c.created_at.clone(),
            c.command.lines().next().unwrap_or_default().to_owned(),
        ]
    });
    print_table(
        &["ID", "STATUS", "EXIT", "PROJECT", "CREATED", "COMMAND"],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn show_command(client: &ApiClient, id: Uuid) -> Result<ExitCode, ClientError> {
    let c = client.command(id).await?;
    let optional = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let fields = [
        ("id", c.id.to_string()),
        ("project", c.project_id.to_string()),
        ("command", c.command.clone()),
        ("priority", c.priority.clone()),
        ("status", c.status.clone()),
        ("position", c.position.map_or("-".into(), |p| p.to_string())),
        (
            "exit code",
            c.exit_code.map_or("-".into(), |e| e.to_string()),
        ),
        ("ended by", optional(&c.termination_reason)),
        ("error", optional(&c.error)),
        ("created", c.created_at.clone()),
        ("started", optional(&c.started_at)),
        ("finished", optional(&c.finished_at)),
        (
            "output",
            format!("{} B stdout, {} B stderr", c.stdout_bytes, c.stderr_bytes),
        ),
    ];
    for (name, value) in fields {
        println!("{:<10} {value}", format!("{name}:"));
    }
    Ok(ExitCode::SUCCESS)
}

/// Output so far (up to the last chunk stored when asked), or with `follow` everything until
/// the end and the command's exit status.
async fn logs(client: &ApiClient, id: Uuid, live: bool) -> Result<ExitCode, ClientError> {
    let notes = Notes {
        progress: std::io::stderr().is_terminal(),
    };
    if live {
        return Ok(match follow(client, id, 0, None, &notes).await? {
            Some(ending) => ExitCode::from(exit_status(&ending)),
            None => ExitCode::SUCCESS,
        });
    }
    let command = client.command(id).await?;
    let final_status = !matches!(command.status.as_str(), "queued" | "running");
    // A finished command's stream replays everything and ends; a live one is read up to what
    // was stored when asked.
    let until = (!final_status).then_some(command.last_seq);
    follow(client, id, 0, until, &notes).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn projects(server: &ServerConfig, action: ProjectsAction) -> ExitCode {
    let client = match ApiClient::new(server) {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    match action {
        ProjectsAction::List => match client.projects().await {
            Ok(projects) => {
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "EXECUTOR",
                        "CONCURRENCY",
                        "WORKDIR",
                        "DESCRIPTION",
                    ],
                    projects.into_iter().map(|p| {
                        vec![
                            p.id.to_string(),
                            p.name,
                            p.executor,
                            p.max_concurrency.to_string(),
                            p.workdir,
                            p.description,
                        ]
                    }),
                );
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
    }
}

/// Left-aligned columns, two spaces apart, the last one unpadded.
pub fn print_table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == last {
                    (*cell).to_owned()
                } else {
                    format!("{cell:<width$}", width = widths[i])
                }
            })
            .collect();
        text.join("  ")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line(headers.to_vec()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ending(status: &str, reason: Option<&str>, code: Option<i32>) -> Ending {
        Ending {
            status: status.into(),
            exit_code: code,
            termination_reason: reason.map(Into::into),
            error: None,
        }
    }

    #[test]
    fn exit_status_follows_the_command_and_names_the_other_endings() {
        assert_eq!(exit_status(&ending("succeeded", Some("exit"), Some(0))), 0);
        assert_eq!(exit_status(&ending("failed", Some("exit"), Some(3))), 3);
        assert_eq!(exit_status(&ending("failed", Some("exit"), Some(256))), 1);
        assert_eq!(exit_status(&ending("failed", Some("signal"), None)), 128);
        assert_eq!(
            exit_status(&ending("failed", Some("start_failed"), None)),
            127
        );
        assert_eq!(
            exit_status(&ending("timed_out", Some("timeout"), None)),
            124
        );
        assert_eq!(exit_status(&ending("cancelled", Some("cancel"), None)), 130);
        assert_eq!(exit_status(&ending("lost", Some("lost"), None)), 129);
        assert_ne!(super::super::EXIT_CLIENT_FAILED, EXIT_LOST);
    }

    #[test]
    fn one_argument_is_a_script_and_several_are_quoted() {
        let script = vec!["make && make test".to_owned()];
        assert_eq!(shell_command(&script).unwrap(), "make && make test");
        let argv = vec!["ls".to_owned(), "-la".to_owned(), "my dir".to_owned()];
        assert_eq!(shell_command(&argv).unwrap(), "ls -la 'my dir'");
    }
}
