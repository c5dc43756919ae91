// Following a command's events with EventSource, resumable without losing or repeating output.
//
// EventSource cannot send an Authorization header, so the stream is opened with a stream token
// from `POST /commands/{id}/stream-token`. After a network drop the browser reconnects by
// itself with the same URL and a `Last-Event-ID` header (the token keeps opening the stream of
// a command that has not ended). When the browser gives up instead (the server answered with
// an error: too many streams, a restart), this class opens a new EventSource with a fresh
// token and `last_event_id` set to the last output it has shown. Either way output events are
// numbered from 1 without gaps: one at or below that number is a repeat and is skipped, one
// past the next number means something was missed and the stream is reopened from the last
// one shown.

import { api } from './api.js';

const FIRST_RETRY_MS = 250;
const MAX_RETRY_MS = 8000;

export class CommandStream {
  /**
   * handlers: { output({stream, data}, seq), status(data), truncated(data), end(data),
   *             connection(state: 'connecting'|'live'|'reconnecting'|'closed'|'failed', detail) }
   */
  constructor(commandId, handlers) {
    this.commandId = commandId;
    this.handlers = handlers;
    this.lastSeq = 0;
    this.source = null;
    this.finished = false;
    this.stopped = false;
    this.retryMs = FIRST_RETRY_MS;
    this.timer = null;
    this.attempts = 0;
    this.onOnline = () => {
      if (!this.source || this.source.readyState !== EventSource.OPEN) this.reconnectSoon(0);
    };
    window.addEventListener('online', this.onOnline);
  }

  async open() {
    if (this.stopped || this.finished) return;
    this.handlers.connection(this.attempts === 0 ? 'connecting' : 'reconnecting');
    this.attempts += 1;
    let tokenResponse;
    try {
      tokenResponse = await api(`/commands/${this.commandId}/stream-token`, { method: 'POST' });
    } catch (error) {
      // A 4xx other than 429 will not get better by retrying (revoked key, deleted command).
      if (error.status >= 400 && error.status < 500 && error.status !== 429) {
        this.handlers.connection('failed', error.message);
        this.stop();
        return;
      }
      this.reconnectSoon();
      return;
    }
    if (this.stopped) return;
    const url = new URL(tokenResponse.events_url, window.location.origin);
    if (this.lastSeq > 0) url.searchParams.set('last_event_id', String(this.lastSeq));
    const source = new EventSource(url);
    this.source = source;
    source.addEventListener('open', () => {
      this.retryMs = FIRST_RETRY_MS;
      this.handlers.connection('live');
    });
    source.addEventListener('output', (event) => this.onOutput(source, event));
    source.addEventListener('status', (event) => this.handlers.status(JSON.parse(event.data)));
    source.addEventListener('truncated', (event) => this.handlers.truncated(JSON.parse(event.data)));
    source.addEventListener('end', (event) => {
      this.finished = true;
      this.close();
      this.handlers.end(JSON.parse(event.data));
      this.handlers.connection('closed');
    });
    source.addEventListener('error', () => {
      if (this.source !== source || this.finished) return;
      if (source.readyState === EventSource.CLOSED) this.reconnectSoon();
      else this.handlers.connection('reconnecting'); // the browser retries, with Last-Event-ID
    });
  }

  onOutput(source, event) {
    if (this.source !== source) return;
    const seq = Number(event.lastEventId);
    if (!Number.isSafeInteger(seq) || seq <= this.lastSeq) return;
    if (seq !== this.lastSeq + 1) {
      this.reconnectSoon(0);
      return;
    }
    this.lastSeq = seq;
    this.handlers.output(JSON.parse(event.data), seq);
  }

  reconnectSoon(delay = this.retryMs) {
    if (this.stopped || this.finished) return;
    this.close();
    this.handlers.connection('reconnecting');
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
    this.retryMs = Math.min(this.retryMs * 2, MAX_RETRY_MS);
  }

  close() {
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }

  /** Stops following for good (another command was opened, or the user signed out). */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.close();
    window.removeEventListener('online', this.onOnline);
  }
}
