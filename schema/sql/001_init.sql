-- ASR Fleet system of record. Applied by `asr-broker --migrate` (and when a broker or worker first
-- connects), all pending files in one transaction; the version table makes re-running harmless.

-- Every job's life, written asynchronously by the broker's event sink. `seq` orders the events:
-- a row is only replaced by a newer event.
CREATE TABLE jobs (
    id            bigint PRIMARY KEY,
    parent        bigint,
    batch         text NOT NULL,
    kind          text NOT NULL,
    state         text NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'failed', 'dead', 'cancelled')),
    priority      integer NOT NULL DEFAULT 0,
    attempts      integer NOT NULL DEFAULT 0,
    submitted_at  timestamptz NOT NULL,
    started_at    timestamptz,
    finished_at   timestamptz,
    worker        text,
    error         text,
    seq           bigint NOT NULL
);
CREATE INDEX jobs_state_idx ON jobs (state);
CREATE INDEX jobs_batch_idx ON jobs (batch);
CREATE INDEX jobs_parent_idx ON jobs (parent) WHERE parent IS NOT NULL;

-- One row per job, written by the worker that ran it; fenced by lease epoch: a row is only ever
-- replaced by a result from a newer lease.
CREATE TABLE results (
    job_id       bigint PRIMARY KEY,
    lease_epoch  bigint NOT NULL,
    worker       text NOT NULL,
    ok           boolean NOT NULL,
    payload      bytea,
    transcript   text,
    error        text,
    run_ms       integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workers (
    id          text PRIMARY KEY,
    host        text NOT NULL,
    device      text NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- The model registry (filled by training jobs).
CREATE TABLE models (
    name         text NOT NULL,
    version      integer NOT NULL,
    bytes        bytea NOT NULL,
    sha256       text NOT NULL,
    config       jsonb NOT NULL DEFAULT '{}',
    vocabulary   text NOT NULL DEFAULT '',
    valid_cer    double precision,
    data_summary jsonb NOT NULL DEFAULT '{}',
    train_seconds double precision,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Index of training checkpoints (bytes only for published ones).
CREATE TABLE checkpoints (
    job_id      bigint NOT NULL,
    step        bigint NOT NULL,
    worker      text NOT NULL,
    loss        double precision,
    valid_cer   double precision,
    published   boolean NOT NULL DEFAULT false,
    bytes       bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, step)
);
