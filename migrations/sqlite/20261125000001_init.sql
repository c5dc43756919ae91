-- The whole schema of rdev-api, named as the product uses it.

CREATE TABLE api_keys (
    id            BLOB PRIMARY KEY,
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL UNIQUE,
    secret_hash   TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    project_ids   TEXT NOT NULL DEFAULT '[]',
    rate_limit    TEXT,
    created_at    TEXT NOT NULL,
    created_by    BLOB,
    expires_at    TEXT,
    revoked_at    TEXT,
    last_used_at  TEXT
);

CREATE TABLE api_key_allowed_ips (
    api_key_id  BLOB NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    cidr        TEXT NOT NULL,
    PRIMARY KEY (api_key_id, cidr)
);

CREATE TABLE projects (
    id                    BLOB PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    description           TEXT NOT NULL DEFAULT '',
    namespace             TEXT,
    pod                   TEXT,
    selector              TEXT,
    container             TEXT,
    workdir               TEXT NOT NULL,
    env                   TEXT NOT NULL DEFAULT '{}',
    max_concurrency       INTEGER NOT NULL,
    default_timeout_secs  INTEGER NOT NULL,
    executor              TEXT NOT NULL,
    -- Maintained by the queue in the same transaction as every move into or out of `running`,
    -- so a claim can respect max_concurrency with one row lock.
    running_commands      INTEGER NOT NULL DEFAULT 0,
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL
);

CREATE TABLE commands (
    -- FIFO order within a priority.
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  BLOB NOT NULL UNIQUE,
    project_id          BLOB NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    command             TEXT NOT NULL,
    env                 TEXT NOT NULL DEFAULT '{}',
    priority            INTEGER NOT NULL,
    timeout_secs        INTEGER NOT NULL,
    status              TEXT NOT NULL,
    submitted_by        BLOB,
    created_at          TEXT NOT NULL,
    started_at          TEXT,
    finished_at         TEXT,
    exit_code           INTEGER,
    termination_reason  TEXT,
    error               TEXT,
    cancel_requested    INTEGER NOT NULL DEFAULT 0,
    lease_owner         TEXT,
    lease_expires_at    TEXT,
    stdout_bytes        INTEGER NOT NULL DEFAULT 0,
    stderr_bytes        INTEGER NOT NULL DEFAULT 0,
    dropped_bytes       INTEGER NOT NULL DEFAULT 0,
    truncated           INTEGER NOT NULL DEFAULT 0,
    last_seq            INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX commands_queue ON commands (priority DESC, seq) WHERE status = 'queued';
CREATE INDEX commands_running_lease ON commands (lease_expires_at) WHERE status = 'running';
CREATE INDEX commands_project ON commands (project_id, seq);
CREATE INDEX commands_project_queue ON commands (project_id, priority DESC, seq) WHERE status = 'queued';

CREATE TABLE command_output (
    command_id  BLOB NOT NULL REFERENCES commands(id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    stream      INTEGER NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (command_id, seq)
);

CREATE TABLE audit_log (
    seq          INTEGER PRIMARY KEY,
    id           BLOB NOT NULL UNIQUE,
    at           TEXT NOT NULL,
    actor_key_id BLOB,
    client_ip    TEXT,
    request_id   TEXT,
    trace_id     TEXT,
    action       TEXT NOT NULL,
    target_type  TEXT NOT NULL,
    target_id    TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    -- TEXT, not JSONB: the hash covers the exact bytes.
    details      TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);

CREATE INDEX audit_log_action ON audit_log (action, seq);
CREATE INDEX audit_log_actor ON audit_log (actor_key_id, seq);

CREATE TABLE rate_limiting (
    bucket        TEXT NOT NULL,
    window_start  TEXT NOT NULL,
    hits          INTEGER NOT NULL,
    PRIMARY KEY (bucket, window_start)
);

CREATE TABLE webhooks (
    id               BLOB PRIMARY KEY,
    url              TEXT NOT NULL,
    events           TEXT NOT NULL,
    project_id       BLOB REFERENCES projects(id) ON DELETE CASCADE,
    description      TEXT NOT NULL DEFAULT '',
    secret           TEXT NOT NULL,
    enabled          INTEGER NOT NULL DEFAULT 1,
    disabled_reason  TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);

CREATE TABLE webhook_deliveries (
    id                BLOB PRIMARY KEY,
    webhook_id        BLOB NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_type        TEXT NOT NULL,
    payload           TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TEXT,
    last_status_code  INTEGER,
    last_latency_ms   INTEGER,
    last_error        TEXT,
    created_at        TEXT NOT NULL,
    delivered_at      TEXT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE idempotency_keys (
    api_key_id    BLOB NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    command_id    BLOB NOT NULL REFERENCES commands(id) ON DELETE CASCADE,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (api_key_id, key)
);
