"""The store's schema: ``MIGRATIONS[i]`` takes the database from version ``i`` to ``i + 1``
(``PRAGMA user_version``), each in its own transaction (:mod:`agent.core.store`). Append, never
edit, a migration.
"""

from __future__ import annotations

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    topic TEXT NOT NULL,
    ts REAL NOT NULL,
    priority INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX outbox_by_stream ON outbox (stream, seq);
CREATE INDEX outbox_by_priority ON outbox (priority, seq);
CREATE INDEX outbox_by_created ON outbox (created);
CREATE TABLE outbox_drops (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    reported_count INTEGER NOT NULL DEFAULT 0,
    reported_bytes INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE usage_counter (
    source TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    tx_bytes INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL,
    tx_packets INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE usage_period (
    iccid TEXT NOT NULL,
    period TEXT NOT NULL,
    source TEXT NOT NULL,
    tx_bytes INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL,
    tx_packets INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL,
    PRIMARY KEY (iccid, period, source)
) WITHOUT ROWID;
CREATE TABLE usage_alert (
    iccid TEXT NOT NULL,
    period TEXT NOT NULL,
    share REAL NOT NULL,
    PRIMARY KEY (iccid, period, share)
) WITHOUT ROWID;
CREATE TABLE usage_plan (iccid TEXT PRIMARY KEY, plan_bytes INTEGER NOT NULL) WITHOUT ROWID;
"""

# The running daemon's own row (agent.core.runtime), read by `simkeeper status`: written when
# something shown changes, the heartbeat at most once a minute.
_V2 = """
CREATE TABLE runtime (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat REAL NOT NULL,
    stopped_at REAL,
    modems TEXT NOT NULL,
    uplink TEXT NOT NULL,
    usage TEXT NOT NULL
);
"""

# Signed commands (agent.commands.journal): each id executed at most once, its result kept for
# repeats until ``keep_until`` (past the envelope's expiry); operator keys installed by
# ``rotate-key``, the newest row being the key in force.
_V3 = """
CREATE TABLE command_journal (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    received_at REAL NOT NULL,
    keep_until REAL NOT NULL,
    status TEXT NOT NULL,
    result TEXT
) WITHOUT ROWID;
CREATE INDEX command_journal_by_keep ON command_journal (keep_until);
CREATE TABLE operator_key (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    pem TEXT NOT NULL,
    installed_at REAL NOT NULL,
    command_id TEXT NOT NULL
);
"""

# The SIM keeper's summaries in the runtime row, for `simkeeper status`.
_V4 = """
ALTER TABLE runtime ADD COLUMN sims TEXT NOT NULL DEFAULT '[]';
"""

# The supervised tasks in the runtime row (agent.core.tasks.Supervisor.status): restarts and
# last error of each long-running part, for `simkeeper status`.
_V5 = """
ALTER TABLE runtime ADD COLUMN tasks TEXT NOT NULL DEFAULT '{}';
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5)
