//! Turns a process's raw output into numbered, stored, published chunks, within a byte cap.
//!
//! The worker hands bytes to [`OutputRecorder::record`]; a writer task stores them in batches
//! (whatever arrived while the previous batch was being written) and only then publishes them, so
//! anything a follower sees live is already in the store it falls back to.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::command::{OutputChunk, OutputStream};
use crate::domain::ids::CommandId;
use crate::ports::{BusEvent, CommandMetrics, OutputBus, OutputProgress, OutputStore, PortError};
use crate::resilience::{Backoff, RetryPolicy, retry};

/// Records queued between the worker and the writer: bounds memory per running command.
const WRITER_BACKLOG: usize = 64;
/// Chunks stored per transaction at most.
const MAX_BATCH: usize = 256;

/// Splits bytes into valid UTF-8, carrying an incomplete trailing character into the next piece.
/// Invalid bytes become U+FFFD, and NUL becomes U+2400 (a visible NUL): text columns cannot hold it.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    carry: Vec<u8>,
}

impl Utf8Decoder {
    pub fn decode(&mut self, bytes: &[u8]) -> String {
        let mut input = std::mem::take(&mut self.carry);
        input.extend_from_slice(bytes);
        let mut out = String::with_capacity(input.len());
        let mut rest = input.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    push_visible(&mut out, valid);
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    push_visible(
                        &mut out,
                        std::str::from_utf8(valid).expect("checked by from_utf8"),
                    );
                    match error.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            self.carry = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// What is left when the stream ends: an incomplete character, replaced.
    pub fn finish(&mut self) -> String {
        if self.carry.is_empty() {
            String::new()
        } else {
            self.carry.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

fn push_visible(out: &mut String, text: &str) {
    if text.contains('\0') {
        out.push_str(&text.replace('\0', "\u{2400}"));
    } else {
        out.push_str(text);
    }
}

enum Record {
    Chunk(OutputChunk, OutputProgress),
    Truncated(OutputProgress),
}

/// Numbers, caps and forwards the output of one running command.
pub struct OutputRecorder {
    command: CommandId,
    cap: u64,
    stored: u64,
    progress: OutputProgress,
    stdout: Utf8Decoder,
    stderr: Utf8Decoder,
    records: mpsc::Sender<Record>,
    writer: JoinHandle<()>,
    metrics: Arc<dyn CommandMetrics>,
}

pub struct RecorderPorts {
    pub store: Arc<dyn OutputStore>,
    pub bus: Arc<dyn OutputBus>,
    pub metrics: Arc<dyn CommandMetrics>,
}

/// Who may write the command's output, and how the writer says that it may not any more.
pub struct Fence {
    /// The lease owner every append is fenced by.
    pub owner: String,
    /// Cancelled when the store refused an append because the lease is gone: the process must stop.
    pub lost: CancellationToken,
    /// How long a batch is retried while the store is unreachable (the worker keeps its command
    /// about as long without a lease renewal); meanwhile the bounded backlog holds the process.
    pub retry_for: Duration,
}

impl OutputRecorder {
    /// Starts the writer for `command`; `cap` is the most output bytes stored.
    pub fn start(command: CommandId, cap: u64, fence: Fence, ports: RecorderPorts) -> Self {
        let (records, rx) = mpsc::channel(WRITER_BACKLOG);
        // Its flushes are children of the command's span.
        let writer = tokio::spawn(
            write_batches(command, fence, rx, ports.store, ports.bus).in_current_span(),
        );
        Self {
            command,
            cap,
            stored: 0,
            progress: OutputProgress::default(),
            stdout: Utf8Decoder::default(),
            stderr: Utf8Decoder::default(),
            records,
            writer,
            metrics: ports.metrics,
        }
    }

    pub async fn record(&mut self, stream: OutputStream, bytes: &[u8]) {
        let len = bytes.len() as i64;
        match stream {
            OutputStream::Stdout => self.progress.stdout_bytes += len,
            OutputStream::Stderr => self.progress.stderr_bytes += len,
        }
        self.metrics.output_bytes(bytes.len() as u64);
        if self.progress.truncated {
            self.progress.dropped_bytes += len;
            return;
        }
        let text = match stream {
            OutputStream::Stdout => self.stdout.decode(bytes),
            OutputStream::Stderr => self.stderr.decode(bytes),
        };
        self.store_text(stream, text).await;
    }

    async fn store_text(&mut self, stream: OutputStream, mut text: String) {
        if text.is_empty() {
            return;
        }
        let room = self.cap.saturating_sub(self.stored) as usize;
        let mut overflow = 0;
        if text.len() > room {
            let mut cut = room;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            overflow = text.len() - cut;
            text.truncate(cut);
        }
        if !text.is_empty() {
            self.stored += text.len() as u64;
            self.progress.last_seq += 1;
            let chunk = OutputChunk {
                seq: self.progress.last_seq,
                stream,
                data: text,
            };
            self.send(Record::Chunk(chunk, self.progress)).await;
        }
        if overflow > 0 {
            // Operators count runaway commands with `grep "output line"` (high-memory runbook).
            tracing::warn!(
                command = %self.command,
                cap = self.cap,
                "output limit reached: further output lines are counted and dropped"
            );
            self.progress.dropped_bytes += overflow as i64;
            self.progress.truncated = true;
            self.send(Record::Truncated(self.progress)).await;
        }
    }

    async fn send(&self, record: Record) {
        // The writer only stops when the channel closes, so a send cannot fail before `finish`.
        let _ = self.records.send(record).await;
    }

    /// Flushes what is left and waits until every record is stored; returns the totals.
    pub async fn finish(mut self) -> OutputProgress {
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let tail = match stream {
                OutputStream::Stdout => self.stdout.finish(),
                OutputStream::Stderr => self.stderr.finish(),
            };
            if !self.progress.truncated {
                self.store_text(stream, tail).await;
            }
        }
        let Self {
            records,
            writer,
            progress,
            ..
        } = self;
        drop(records);
        if let Err(error) = writer.await {
            tracing::error!(%error, "output writer task failed");
        }
        progress
    }
}

async fn write_batches(
    command: CommandId,
    fence: Fence,
    mut rx: mpsc::Receiver<Record>,
    store: Arc<dyn OutputStore>,
    bus: Arc<dyn OutputBus>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut chunks = Vec::with_capacity(batch.len());
        let mut progress = OutputProgress::default();
        let mut truncated_now = false;
        for record in batch.drain(..) {
            match record {
                Record::Chunk(chunk, after) => {
                    chunks.push(chunk);
                    progress = after;
                }
                Record::Truncated(after) => {
                    truncated_now = true;
                    progress = after;
                }
            }
        }
        if fence.lost.is_cancelled() {
            // Fenced off: nothing more of this command may be stored or shown.
            continue;
        }
        let flush = tracing::info_span!(
            "output.flush",
            otel.kind = "internal",
            command = %command,
            chunks = chunks.len(),
        );
        match store_with_retry(store.as_ref(), command, &fence, &chunks, progress)
            .instrument(flush)
            .await
        {
            Stored::Yes => {}
            // Followers read gaps from the store; what it lacks is not shown live either.
            Stored::Dropped => continue,
            Stored::LeaseLost => {
                tracing::warn!(%command, "output refused: the lease is gone; stopping the command");
                fence.lost.cancel();
                continue;
            }
        }
        for chunk in chunks {
            bus.publish(command, BusEvent::Output(Arc::new(chunk)))
                .await;
        }
        if truncated_now {
            bus.publish(command, BusEvent::Truncated).await;
        }
    }
}

enum Stored {
    Yes,
    Dropped,
    LeaseLost,
}

/// Pauses between attempts to store a batch.
const STORE_BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(50),
    max: Duration::from_secs(1),
};

async fn store_with_retry(
    store: &dyn OutputStore,
    command: CommandId,
    fence: &Fence,
    chunks: &[OutputChunk],
    progress: OutputProgress,
) -> Stored {
    let policy = RetryPolicy {
        backoff: STORE_BACKOFF,
        tries: None,
        for_at_most: Some(fence.retry_for),
    };
    let stored = retry(
        policy,
        || store.append(command, &fence.owner, chunks, progress),
        |error, attempt| {
            // A lost lease is final: another replica owns the command now.
            let again = !matches!(error, PortError::LeaseLost);
            if again {
                tracing::warn!(%command, attempt, error = %error, "storing output failed, retrying");
            }
            again
        },
    )
    .await;
    match stored {
        Ok(()) => Stored::Yes,
        Err(PortError::LeaseLost) => Stored::LeaseLost,
        Err(error) => {
            tracing::error!(%command, chunks = chunks.len(), error = %error, "output could not be stored and was dropped");
            Stored::Dropped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_are_joined_across_pieces() {
        let text = "héllo wörld ✓";
        let bytes = text.as_bytes();
        for split in 0..bytes.len() {
            let mut decoder = Utf8Decoder::default();
            let mut out = decoder.decode(&bytes[..split]);
            out += &decoder.decode(&bytes[split..]);
            out += &decoder.finish();
            assert_eq!(out, text, "split at {split}");
        }
    }

    #[test]
    fn nul_becomes_a_visible_symbol() {
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.decode(b"a\0b"), "a\u{2400}b");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut decoder = Utf8Decoder::default();
        assert_eq!(decoder.decode(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(decoder.decode(b"c\xe2\x9c"), "c");
        assert_eq!(decoder.finish(), "\u{fffd}");
    }
}
