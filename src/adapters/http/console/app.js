// The rdev-api web console: sign in with an API key, run commands, watch them live.

import { api, storedKey, storeKey, forgetKey, ApiError } from './api.js';
import { AnsiWriter } from './ansi.js';
import { CommandStream } from './stream.js';

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;
const POSITION_POLL_MS = 2000;
const FINAL = new Set(['succeeded', 'failed', 'cancelled', 'timed_out', 'lost']);

const state = {
  projects: new Map(),
  command: null, // the command shown in the viewer
  stream: null,
  writers: null,
  follow: true,
  refreshTimer: null,
  positionTimer: null,
};

function setText(id, text) {
  $(id).textContent = text;
}

function showError(id, error) {
  // A key revoked or expired mid-session: back to sign-in, saying why.
  if (error instanceof ApiError && error.status === 401 && storedKey()) {
    signOut();
    setText('sign-in-error', `Signed out: ${error.message}`);
    return;
  }
  setText(id, error ? (error instanceof Error ? error.message : String(error)) : '');
}

// ---- sign in -------------------------------------------------------------------------------

async function signIn(key) {
  const me = await api('/me', { key });
  storeKey(key);
  setText('who-name', `${me.name} · ${me.scopes.join(', ')}`);
  $('who').hidden = false;
  $('sign-in').hidden = true;
  $('workspace').hidden = false;
  await loadProjects();
  refreshAll();
  clearInterval(state.refreshTimer);
  state.refreshTimer = setInterval(() => {
    if (document.visibilityState === 'visible') refreshAll();
  }, REFRESH_MS);
  $('command').focus();
}

function signOut() {
  forgetKey();
  clearInterval(state.refreshTimer);
  stopViewer();
  $('workspace').hidden = true;
  $('who').hidden = true;
  $('sign-in').hidden = false;
  $('api-key').value = '';
  $('api-key').focus();
}

// ---- projects and pods ---------------------------------------------------------------------

async function loadProjects() {
  const { items } = await api('/projects');
  const select = $('project');
  const previous = select.value;
  select.replaceChildren();
  state.projects.clear();
  for (const project of items) {
    state.projects.set(project.id, project);
    const option = document.createElement('option');
    option.value = project.id;
    option.textContent = `${project.name} (${project.executor})`;
    select.appendChild(option);
  }
  if (items.length === 0) {
    const option = document.createElement('option');
    option.value = '';
    option.textContent = 'No projects: create one with POST /api/v1/projects';
    select.appendChild(option);
  }
  if (state.projects.has(previous)) select.value = previous;
  showPod();
}

async function showPod() {
  const pod = $('pod');
  const project = state.projects.get($('project').value);
  if (!project || project.executor !== 'kube') {
    pod.hidden = true;
    return;
  }
  pod.hidden = false;
  pod.textContent = 'Pod: checking…';
  try {
    const status = await api(`/projects/${project.id}/pod`);
    const parts = [status.name, status.phase, status.ready ? 'ready' : 'not ready'];
    if (status.restarts !== undefined) parts.push(`${status.restarts} restarts`);
    pod.textContent = `Pod: ${parts.filter((p) => p !== undefined && p !== null).join(' · ')}`;
  } catch (error) {
    pod.textContent =
      error.status === 404 && error.type === 'urn:rdev:problem:not-found'
        ? 'Pod status is not available for this project on this server.'
        : `Pod: ${error.message}`;
  }
}

// ---- queue and recent commands -------------------------------------------------------------

function projectName(id) {
  return state.projects.get(id)?.name ?? id.slice(0, 8);
}

function cell(row, text, header = false) {
  const td = document.createElement(header ? 'th' : 'td');
  td.textContent = String(text);
  row.appendChild(td);
}

async function refreshQueue() {
  const target = $('queue');
  try {
    const queue = await api('/queue');
    const summary = document.createElement('p');
    const byPriority = ['critical', 'high', 'normal', 'low']
      .map((p) => `${p} ${queue.queued[p] ?? 0}`)
      .join(' · ');
    summary.textContent = `${queue.queued_total} queued (${byPriority}), ${queue.running} running`;
    const table = document.createElement('table');
    const head = table.createTHead().insertRow();
    ['Project', 'Queued', 'Running'].forEach((h) => cell(head, h, true));
    const body = table.createTBody();
    for (const load of queue.projects) {
      const row = body.insertRow();
      cell(row, projectName(load.project_id));
      cell(row, load.queued);
      cell(row, load.running);
    }
    target.replaceChildren(summary, ...(queue.projects.length ? [table] : []));
  } catch (error) {
    target.textContent = error.message;
  }
}

async function refreshRecent() {
  const list = $('recent');
  try {
    const { items } = await api('/commands?limit=15');
    list.replaceChildren(
      ...items.map((command) => {
        const li = document.createElement('li');
        const button = document.createElement('button');
        button.type = 'button';
        const code = document.createElement('code');
        code.textContent = command.command;
        const meta = document.createElement('small');
        const exit = command.exit_code === null ? '' : ` · exit ${command.exit_code}`;
        meta.textContent = `${command.status}${exit} · ${projectName(command.project_id)} · ${new Date(command.created_at).toLocaleTimeString()}`;
        button.append(code, meta);
        button.setAttribute('aria-label', `Show ${command.command} (${command.status})`);
        button.addEventListener('click', () => openCommand(command));
        li.appendChild(button);
        return li;
      }),
    );
    if (items.length === 0) list.textContent = 'No commands yet.';
  } catch (error) {
    list.textContent = error.message;
  }
}

function refreshAll() {
  refreshQueue();
  refreshRecent();
}

// ---- the viewer ----------------------------------------------------------------------------

function stopViewer() {
  if (state.stream) state.stream.stop();
  state.stream = null;
  clearInterval(state.positionTimer);
  state.command = null;
  $('cancel').disabled = true;
}

function showStatus(status, extra = {}) {
  const el = $('status');
  const reason = extra.termination_reason && extra.termination_reason !== 'exit' ? ` (${extra.termination_reason})` : '';
  el.textContent = `${status}${reason}`;
  el.className = `status-${status}`;
  if ('exit_code' in extra) setText('exit-code', extra.exit_code ?? '–');
  if (status === 'queued') {
    setText('position', extra.position ?? '–');
    watchPosition();
  } else {
    setText('position', '–');
    clearInterval(state.positionTimer);
  }
  $('cancel').disabled = FINAL.has(status);
  if (state.command) state.command.status = status;
}

// The event stream says the position when the command is queued; it changes as commands ahead
// of it start, so poll it while queued.
function watchPosition() {
  clearInterval(state.positionTimer);
  const id = state.command?.id;
  state.positionTimer = setInterval(async () => {
    if (!state.command || state.command.id !== id || state.command.status !== 'queued') {
      clearInterval(state.positionTimer);
      return;
    }
    try {
      const command = await api(`/commands/${id}`);
      if (state.command?.id === id && command.status === 'queued') setText('position', command.position ?? '–');
    } catch {
      // The stream reports problems; a missed poll is harmless.
    }
  }, POSITION_POLL_MS);
}

function scrollIfFollowing() {
  const output = $('output');
  if (state.follow) output.scrollTop = output.scrollHeight;
}

function openCommand(command) {
  stopViewer();
  state.command = { id: command.id, status: command.status };
  const output = $('output');
  output.replaceChildren();
  output.dataset.commandId = command.id;
  output.dataset.lastSeq = '0';
  state.writers = {
    stdout: new AnsiWriter(output, 'out-stdout'),
    stderr: new AnsiWriter(output, 'out-stderr'),
  };
  state.follow = true;
  $('follow').hidden = true;
  setText('viewer-command', `$ ${command.command}`);
  setText('exit-code', command.exit_code ?? '–');
  showError('viewer-error', null);
  showStatus(command.status, command);
  state.stream = new CommandStream(command.id, {
    output(chunk, seq) {
      state.writers[chunk.stream === 'stderr' ? 'stderr' : 'stdout'].write(chunk.data);
      output.dataset.lastSeq = String(seq);
      scrollIfFollowing();
    },
    status(data) {
      showStatus(data.status, data);
    },
    truncated(data) {
      const note = document.createElement('span');
      note.className = 'note';
      note.textContent = `\n[${data.message}]\n`;
      output.appendChild(note);
      scrollIfFollowing();
    },
    end(data) {
      showStatus(data.status, data);
      refreshAll();
    },
    connection(stateName, detail) {
      const labels = { connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', closed: 'ended', failed: 'failed' };
      setText('connection', labels[stateName] ?? stateName);
      $('connection').dataset.state = stateName;
      if (detail) showError('viewer-error', detail);
    },
  });
  state.stream.open();
}

async function cancelCommand() {
  if (!state.command) return;
  const button = $('cancel');
  button.disabled = true;
  try {
    const command = await api(`/commands/${state.command.id}/cancel`, { method: 'POST' });
    showError('viewer-error', null);
    if (FINAL.has(command.status)) showStatus(command.status, command);
  } catch (error) {
    showError('viewer-error', error);
    button.disabled = state.command && FINAL.has(state.command.status);
  }
}

async function runCommand(event) {
  event.preventDefault();
  showError('run-error', null);
  const projectId = $('project').value;
  if (!projectId) {
    showError('run-error', 'Choose a project first.');
    return;
  }
  const body = { command: $('command').value, priority: $('priority').value };
  const timeout = $('timeout').value.trim();
  if (timeout) body.timeout_secs = Number(timeout);
  const button = $('run');
  button.disabled = true;
  try {
    const command = await api(`/projects/${projectId}/commands`, { method: 'POST', body });
    openCommand(command);
    // On a phone the output sits below the form: bring it into view.
    if (window.matchMedia('(max-width: 800px)').matches) $('viewer').scrollIntoView({ block: 'start' });
    refreshAll();
  } catch (error) {
    showError('run-error', error);
  } finally {
    button.disabled = false;
  }
}

// ---- wiring --------------------------------------------------------------------------------

function wire() {
  $('sign-in-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    showError('sign-in-error', null);
    try {
      await signIn($('api-key').value.trim());
    } catch (error) {
      showError('sign-in-error', error instanceof ApiError && error.status === 401 ? 'That key was not accepted.' : error);
    }
  });
  $('sign-out').addEventListener('click', signOut);
  $('project').addEventListener('change', showPod);
  $('run-form').addEventListener('submit', runCommand);
  $('command').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $('run-form').requestSubmit();
    }
  });
  $('cancel').addEventListener('click', cancelCommand);
  $('queue-refresh').addEventListener('click', refreshQueue);
  $('recent-refresh').addEventListener('click', refreshRecent);
  const output = $('output');
  // Follow new output only while the view is at the bottom; scrolling up stops it.
  output.addEventListener('scroll', () => {
    const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
    state.follow = atBottom;
    $('follow').hidden = atBottom;
  });
  $('follow').addEventListener('click', () => {
    state.follow = true;
    $('follow').hidden = true;
    scrollIfFollowing();
    output.focus();
  });
}

wire();
const key = storedKey();
if (key) {
  signIn(key).catch(() => signOut());
} else {
  $('api-key').focus();
}
