//! The recordings index: its schema on SQLite (one machine) and PostgreSQL (several
//! instances), and the statements every write runs inside its transaction. The SQL is
//! shared where the dialects agree (`$1, $2, …` in order of first use); [`Dialect`] says
//! the rest (row locks, substring search).
//!
//! One writer per session across instances: every write first makes sure the session's
//! row exists (`INSERT … ON CONFLICT DO NOTHING`), then locks it (`SELECT … FOR UPDATE` in
//! PostgreSQL; SQLite has one writer at a time anyway), and decides from what it reads
//! under that lock. Chunk numbers are a primary key: a race is a duplicate, never a fork.
//!
//! Parameters are numbered in order of first use in each statement (SQLite numbers `$N`
//! by appearance).

use crate::config::StateConfig;
use crate::workflow::db::{Db, DbError, Tx, Value};
use std::path::Path;

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, host TEXT NOT NULL, login TEXT, sub TEXT,
    started_at TEXT, ended_at TEXT, status TEXT NOT NULL DEFAULT 'live', problem TEXT, meta TEXT);
CREATE TABLE IF NOT EXISTS chunks (session TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL,
    hash TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (session, stream, seq));
CREATE TABLE IF NOT EXISTS commands (session TEXT NOT NULL, time REAL, path TEXT, argv TEXT,
    verdict TEXT, rule TEXT);
CREATE INDEX IF NOT EXISTS commands_session ON commands(session);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_at);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until INTEGER NOT NULL);
";

const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, host TEXT NOT NULL, login TEXT, sub TEXT,
    started_at TEXT, ended_at TEXT, status TEXT NOT NULL DEFAULT 'live', problem TEXT, meta TEXT);
CREATE TABLE IF NOT EXISTS chunks (session TEXT NOT NULL, stream TEXT NOT NULL, seq BIGINT NOT NULL,
    hash TEXT NOT NULL, size BIGINT NOT NULL, PRIMARY KEY (session, stream, seq));
CREATE TABLE IF NOT EXISTS commands (session TEXT NOT NULL, time DOUBLE PRECISION, path TEXT, argv TEXT,
    verdict TEXT, rule TEXT);
CREATE INDEX IF NOT EXISTS commands_session ON commands(session);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_at);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until BIGINT NOT NULL);
";

/// Columns added since the first schema (an index made by an older collector gains them
/// on open): (table, column, SQLite type, PostgreSQL type).
const ADDED_COLUMNS: [(&str, &str, &str, &str); 12] = [
    ("sessions", "meta_hash", "TEXT", "TEXT"),
    ("sessions", "sealed_at", "INTEGER", "BIGINT"),
    ("sessions", "seal", "TEXT", "TEXT"),
    (
        "sessions",
        "hold",
        "INTEGER NOT NULL DEFAULT 0",
        "BIGINT NOT NULL DEFAULT 0",
    ),
    ("sessions", "hold_reason", "TEXT", "TEXT"),
    ("sessions", "hold_by", "TEXT", "TEXT"),
    ("sessions", "hold_at", "INTEGER", "BIGINT"),
    ("sessions", "flagged_by", "TEXT", "TEXT"),
    ("sessions", "created_at", "INTEGER", "BIGINT"),
    // The search's order: the start, '' until the metadata says it (keyset pages on
    // (sort_key, id), through an index).
    (
        "sessions",
        "sort_key",
        "TEXT NOT NULL DEFAULT ''",
        "TEXT NOT NULL DEFAULT ''",
    ),
    (
        "chunks",
        "encoding",
        "TEXT NOT NULL DEFAULT 'identity'",
        "TEXT NOT NULL DEFAULT 'identity'",
    ),
    ("chunks", "object", "TEXT", "TEXT"),
];

/// The advisory lock PostgreSQL instances take to run the schema one at a time.
const SCHEMA_LOCK: i64 = 7715002;

/// What differs between the engines.
#[derive(Debug, Clone, Copy)]
pub struct Dialect {
    pub postgres: bool,
}

impl Dialect {
    /// Appended to the `SELECT` that takes a session's row for a write.
    pub fn for_update(self) -> &'static str {
        if self.postgres {
            " FOR UPDATE"
        } else {
            ""
        }
    }

    /// `f(haystack, needle) > 0` finds a substring.
    pub fn substring_fn(self) -> &'static str {
        if self.postgres {
            "strpos"
        } else {
            "instr"
        }
    }
}

/// The PostgreSQL schema (namespace) the index's tables live in: the database may be the
/// workflow's (`[state]`), whose tables (its own `commands`) must not meet these.
pub const POSTGRES_NAMESPACE: &str = "usher_recordings";

/// `url` with the index's namespace first on every connection's search path.
fn in_namespace(url: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20search_path%3D{POSTGRES_NAMESPACE}")
    } else {
        format!("{url} options='-c search_path={POSTGRES_NAMESPACE}'")
    }
}

/// Opens (and creates, or brings up to date) the index `config` names: the writers'
/// connection, the readers', and what differs between the engines.
pub fn open(config: &StateConfig, data_dir: &Path) -> Result<(Db, Db, Dialect), DbError> {
    let config = match config {
        StateConfig::Sqlite => StateConfig::Sqlite,
        StateConfig::Postgres { url } => StateConfig::Postgres {
            url: in_namespace(url),
        },
    };
    let config = &config;
    let mut postgres_schema = format!(
        "CREATE SCHEMA IF NOT EXISTS {POSTGRES_NAMESPACE}; SET search_path TO {POSTGRES_NAMESPACE};\n"
    );
    postgres_schema.push_str(POSTGRES_SCHEMA);
    for (table, column, _, pg_type) in ADDED_COLUMNS {
        postgres_schema.push_str(&format!(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {pg_type};\n"
        ));
    }
    postgres_schema.push_str(INDEXES);
    let sqlite_path = data_dir.join("index.sqlite");
    let db = Db::open_with_schema(
        config,
        &sqlite_path,
        SQLITE_SCHEMA,
        &postgres_schema,
        SCHEMA_LOCK,
    )?;
    let dialect = Dialect {
        postgres: db.is_postgres(),
    };
    if !dialect.postgres {
        db.transaction_blocking(|tx| -> Result<(), DbError> {
            for (table, column, sqlite_type, _) in ADDED_COLUMNS {
                let have = tx.query(
                    &format!("SELECT name FROM pragma_table_info('{table}') WHERE name = $1"),
                    &[column.into()],
                )?;
                if have.is_empty() {
                    tx.execute(
                        &format!("ALTER TABLE {table} ADD COLUMN {column} {sqlite_type}"),
                        &[],
                    )?;
                }
            }
            for statement in INDEXES.split(';').filter(|s| !s.trim().is_empty()) {
                tx.execute(statement, &[])?;
            }
            Ok(())
        })?;
    }
    let reader = db.reader(config, &sqlite_path)?;
    Ok((db, reader, dialect))
}

/// Indexes on added columns (made after the columns exist).
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS sessions_hold ON sessions(hold);
CREATE INDEX IF NOT EXISTS sessions_order ON sessions(sort_key, id);
UPDATE sessions SET sort_key = started_at WHERE sort_key = '' AND started_at IS NOT NULL;
";

/// A session's row as a write sees it, locked for the rest of the transaction.
pub struct LockedSession {
    pub host: String,
    pub status: String,
    pub meta_hash: Option<String>,
    /// A seal was accepted (by any instance).
    pub sealed: bool,
}

impl LockedSession {
    /// Why `host` may not write to this session, if it may not: it is another host's, or
    /// retention is deleting it.
    pub fn refuses(&self, id: &str, host: &str) -> Option<super::Refused> {
        if self.host != host {
            return Some(super::Refused::Forbidden(format!(
                "session {id} belongs to another host"
            )));
        }
        if self.status == super::DELETING {
            return Some(super::Refused::Forbidden(format!(
                "session {id} is being deleted (retention)"
            )));
        }
        None
    }
}

/// Makes the session's row if it is new (owned by `host`), then locks it.
pub fn lock_session(
    tx: &mut dyn Tx,
    dialect: Dialect,
    id: &str,
    host: &str,
    now: i64,
) -> Result<LockedSession, DbError> {
    tx.execute(
        "INSERT INTO sessions (id, host, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        &[id.into(), host.into(), now.into()],
    )?;
    let rows = tx.query(
        &format!(
            "SELECT host, status, meta_hash,
                    CASE WHEN sealed_at IS NOT NULL OR status = 'complete' THEN 1 ELSE 0 END
             FROM sessions WHERE id = $1{}",
            dialect.for_update()
        ),
        &[id.into()],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| DbError::Corrupt(format!("session {id} vanished")))?;
    Ok(LockedSession {
        host: row[0].text().unwrap_or_default().to_string(),
        status: row[1].text().unwrap_or_default().to_string(),
        meta_hash: row[2].text().map(String::from),
        sealed: row[3].int().unwrap_or(0) != 0,
    })
}

/// The session's host, if the session is known (no lock: for reads).
pub fn owner(tx: &mut dyn Tx, id: &str) -> Result<Option<String>, DbError> {
    Ok(tx
        .query("SELECT host FROM sessions WHERE id = $1", &[id.into()])?
        .first()
        .and_then(|r| r[0].text().map(String::from)))
}

/// Where a stream's stored chain ends: `(next_seq, last hash)`, `None` when empty.
pub fn stream_end(
    tx: &mut dyn Tx,
    id: &str,
    stream: &str,
) -> Result<Option<(u64, String)>, DbError> {
    let rows = tx.query(
        "SELECT seq, hash FROM chunks WHERE session = $1 AND stream = $2 ORDER BY seq DESC LIMIT 1",
        &[id.into(), stream.into()],
    )?;
    Ok(rows.first().map(|r| {
        (
            r[0].int().unwrap_or(-1).saturating_add(1) as u64,
            r[1].text().unwrap_or_default().to_string(),
        )
    }))
}

/// The stored hash of chunk `seq`.
pub fn chunk_hash(
    tx: &mut dyn Tx,
    id: &str,
    stream: &str,
    seq: u64,
) -> Result<Option<String>, DbError> {
    Ok(tx
        .query(
            "SELECT hash FROM chunks WHERE session = $1 AND stream = $2 AND seq = $3",
            &[id.into(), stream.into(), (seq as i64).into()],
        )?
        .first()
        .and_then(|r| r[0].text().map(String::from)))
}

/// Marks the session tampered, saying why and which writer's write showed it.
pub fn flag(tx: &mut dyn Tx, id: &str, problem: &str, writer: &str) -> Result<(), DbError> {
    tx.execute(
        "UPDATE sessions SET status = 'tampered', problem = $1, flagged_by = $2 WHERE id = $3",
        &[problem.into(), writer.into(), id.into()],
    )?;
    Ok(())
}

/// An exec event of an audit chunk, as the index keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRow {
    pub time: Option<f64>,
    pub path: Option<String>,
    pub argv: Option<String>,
    pub verdict: Option<String>,
    pub rule: Option<String>,
}

/// The exec events of an audit chunk (JSON lines; other lines are not commands).
pub fn commands_of(audit_chunk: &[u8]) -> Vec<CommandRow> {
    audit_chunk
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter(|v| v["event"] == "exec")
        .map(|v| {
            let e = &v["exec"];
            CommandRow {
                time: e["time"].as_f64(),
                path: e["path"].as_str().map(String::from),
                argv: e["argv"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                }),
                verdict: e["verdict"].as_str().map(String::from),
                rule: e["rule"].as_str().map(String::from),
            }
        })
        .collect()
}

/// A chunk's row and its commands.
#[allow(clippy::too_many_arguments)]
pub fn insert_chunk(
    tx: &mut dyn Tx,
    id: &str,
    stream: &str,
    seq: u64,
    hash: &str,
    size: usize,
    encoding: &str,
    object: &str,
    commands: &[CommandRow],
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO chunks (session, stream, seq, hash, size, encoding, object) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            id.into(),
            stream.into(),
            (seq as i64).into(),
            hash.into(),
            (size as i64).into(),
            encoding.into(),
            object.into(),
        ],
    )?;
    for c in commands {
        tx.execute(
            "INSERT INTO commands (session, time, path, argv, verdict, rule) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                id.into(),
                c.time.map(Value::Real).unwrap_or(Value::Null),
                c.path.clone().into(),
                c.argv.clone().into(),
                c.verdict.clone().into(),
                c.rule.clone().into(),
            ],
        )?;
    }
    Ok(())
}

/// Takes (or keeps) the lease `name` for `holder` until `until` when it is free or ran
/// out at `now`: whether `holder` has it.
pub fn take_lease(
    tx: &mut dyn Tx,
    name: &str,
    holder: &str,
    now: i64,
    until: i64,
) -> Result<bool, DbError> {
    tx.execute(
        "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        &[name.into(), "".into(), 0i64.into()],
    )?;
    let n = tx.execute(
        "UPDATE leases SET holder = $1, until = $2 WHERE name = $3 AND (until < $4 OR holder = $1)",
        &[holder.into(), until.into(), name.into(), now.into()],
    )?;
    Ok(n == 1)
}

/// Gives the lease back (another instance may take it at once).
pub fn release_lease(tx: &mut dyn Tx, name: &str, holder: &str) -> Result<(), DbError> {
    tx.execute(
        "UPDATE leases SET until = 0 WHERE name = $1 AND holder = $2",
        &[name.into(), holder.into()],
    )?;
    Ok(())
}
