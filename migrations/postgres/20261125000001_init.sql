-- The whole schema of rdev-api, named as the product uses it.

CREATE TABLE api_keys (
    id            UUID PRIMARY KEY,
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL UNIQUE,
    secret_hash   TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    project_ids   TEXT NOT NULL DEFAULT '[]',
    rate_limit    TEXT,
    created_at    TIMESTAMPTZ NOT NULL,
    created_by    UUID,
    expires_at    TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ,
    last_used_at  TIMESTAMPTZ
);

CREATE TABLE api_key_allowed_ips (
    api_key_id  UUID NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    cidr        TEXT NOT NULL,
    PRIMARY KEY (api_key_id, cidr)
);

CREATE TABLE projects (
    id                    UUID PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    description           TEXT NOT NULL DEFAULT '',
    namespace             TEXT,
    pod                   TEXT,
    selector              TEXT,
    container             TEXT,
    workdir               TEXT NOT NULL,
    env                   TEXT NOT NULL DEFAULT '{}',
    max_concurrency       BIGINT NOT NULL,
    default_timeout_secs  BIGINT NOT NULL,
    executor              TEXT NOT NULL,
    -- Maintained by the queue in the same transaction as every move into or out of `running`,
    -- so a claim can respect max_concurrency with one row lock.
    running_commands      BIGINT NOT NULL DEFAULT 0,
    created_at            TIMESTAMPTZ NOT NULL,
    updated_at            TIMESTAMPTZ NOT NULL
);

CREATE TABLE commands (
    id                  UUID PRIMARY KEY,
    -- FIFO order within a priority.
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    project_id          UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    command             TEXT NOT NULL,
    env                 TEXT NOT NULL DEFAULT '{}',
    priority            BIGINT NOT NULL,
    timeout_secs        BIGINT NOT NULL,
    status              TEXT NOT NULL,
    submitted_by        UUID,
    created_at          TIMESTAMPTZ NOT NULL,
    started_at          TIMESTAMPTZ,
    finished_at         TIMESTAMPTZ,
    exit_code           BIGINT,
    termination_reason  TEXT,
    error               TEXT,
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    lease_owner         TEXT,
    lease_expires_at    TIMESTAMPTZ,
    stdout_bytes        BIGINT NOT NULL DEFAULT 0,
    stderr_bytes        BIGINT NOT NULL DEFAULT 0,
    dropped_bytes       BIGINT NOT NULL DEFAULT 0,
    truncated           BOOLEAN NOT NULL DEFAULT FALSE,
    last_seq            BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX commands_queue ON commands (priority DESC, seq) WHERE status = 'queued';
CREATE INDEX commands_running_lease ON commands (lease_expires_at) WHERE status = 'running';
CREATE INDEX commands_project ON commands (project_id, seq);
CREATE INDEX commands_project_queue ON commands (project_id, priority DESC, seq) WHERE status = 'queued';

CREATE TABLE command_output (
    command_id  UUID NOT NULL REFERENCES commands(id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    stream      BIGINT NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (command_id, seq)
);

CREATE TABLE audit_log (
    seq          BIGINT PRIMARY KEY,
    id           UUID NOT NULL UNIQUE,
    at           TIMESTAMPTZ NOT NULL,
    actor_key_id UUID,
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
    window_start  TIMESTAMPTZ NOT NULL,
    hits          BIGINT NOT NULL,
    PRIMARY KEY (bucket, window_start)
);

CREATE TABLE webhooks (
    id               UUID PRIMARY KEY,
    url              TEXT NOT NULL,
    events           TEXT NOT NULL,
    project_id       UUID REFERENCES projects(id) ON DELETE CASCADE,
    description      TEXT NOT NULL DEFAULT '',
    secret           TEXT NOT NULL,
    enabled          BOOLEAN NOT NULL DEFAULT TRUE,
    disabled_reason  TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);

CREATE TABLE webhook_deliveries (
    id                UUID PRIMARY KEY,
    webhook_id        UUID NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_type        TEXT NOT NULL,
    payload           TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          BIGINT NOT NULL DEFAULT 0,
    next_attempt_at   TIMESTAMPTZ,
    last_status_code  BIGINT,
    last_latency_ms   BIGINT,
    last_error        TEXT,
    created_at        TIMESTAMPTZ NOT NULL,
    delivered_at      TIMESTAMPTZ
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE idempotency_keys (
    api_key_id    UUID NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    command_id    UUID NOT NULL REFERENCES commands(id) ON DELETE CASCADE,
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (api_key_id, key)
);
