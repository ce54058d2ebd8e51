//! The workflow's state: SQLite (one instance) or PostgreSQL (several instances behind one
//! address), behind one small transaction interface. The SQL is shared where the dialects
//! agree: parameters are written `$1, $2, …` in order of first use (SQLite numbers named
//! parameters that way), and only the schema differs.
//!
//! Tables: `requests`, `reviews`, `grants`, `revocations` (access requests), `commands`
//! (commands inside sessions waiting for approval, `commands.rs`), `audit`, `meta`.
//!
//! Both backends are blocking clients called from `spawn_blocking` (the PostgreSQL one is
//! tokio-postgres underneath). Decisions that must hold across instances are made inside one
//! transaction with conditional updates; nothing relies on an in-memory lock.

use crate::config::StateConfig;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A column's value, in the few types the schema uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    /// The recordings index's command times (seconds, fractional).
    Real(f64),
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map(Into::into).unwrap_or(Value::Null)
    }
}

impl Value {
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }
    pub fn real(&self) -> Option<f64> {
        match self {
            Value::Real(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Text(v) => Some(v),
            _ => None,
        }
    }
}

pub type Row = Vec<Value>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("stored data: {0}")]
    Corrupt(String),
    #[error("the state store's worker stopped: {0}")]
    Join(String),
}

/// One transaction: statements run in it, and it commits when the closure that holds it
/// returns `Ok`.
pub trait Tx {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError>;
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, text_value TEXT, int_value INTEGER);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, requester_sub TEXT NOT NULL, host TEXT NOT NULL, state TEXT NOT NULL,
    created_at INTEGER NOT NULL, pending_until INTEGER NOT NULL, version INTEGER NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state);
CREATE TABLE IF NOT EXISTS reviews (
    request_id TEXT NOT NULL, sub TEXT NOT NULL, decision TEXT NOT NULL, at INTEGER NOT NULL,
    signature TEXT NOT NULL, PRIMARY KEY (request_id, sub));
CREATE TABLE IF NOT EXISTS grants (
    jti TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, host TEXT NOT NULL, sub TEXT NOT NULL,
    exp INTEGER NOT NULL, token TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS grants_host ON grants (host, exp);
CREATE TABLE IF NOT EXISTS revocations (
    jti TEXT PRIMARY KEY, host TEXT NOT NULL, exp INTEGER NOT NULL, at INTEGER NOT NULL,
    by_sub TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, event TEXT NOT NULL,
    actor TEXT NOT NULL, request_id TEXT, grant_id TEXT, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_request ON audit (request_id);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, host TEXT NOT NULL, sub TEXT NOT NULL, state TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, version INTEGER NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS commands_state ON commands (state, expires_at);
INSERT INTO meta (key, int_value) VALUES ('revision', 0) ON CONFLICT (key) DO NOTHING;
";

const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, text_value TEXT, int_value BIGINT);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, requester_sub TEXT NOT NULL, host TEXT NOT NULL, state TEXT NOT NULL,
    created_at BIGINT NOT NULL, pending_until BIGINT NOT NULL, version BIGINT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state);
CREATE TABLE IF NOT EXISTS reviews (
    request_id TEXT NOT NULL, sub TEXT NOT NULL, decision TEXT NOT NULL, at BIGINT NOT NULL,
    signature TEXT NOT NULL, PRIMARY KEY (request_id, sub));
CREATE TABLE IF NOT EXISTS grants (
    jti TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, host TEXT NOT NULL, sub TEXT NOT NULL,
    exp BIGINT NOT NULL, token TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS grants_host ON grants (host, exp);
CREATE TABLE IF NOT EXISTS revocations (
    jti TEXT PRIMARY KEY, host TEXT NOT NULL, exp BIGINT NOT NULL, at BIGINT NOT NULL,
    by_sub TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq BIGSERIAL PRIMARY KEY, at BIGINT NOT NULL, event TEXT NOT NULL,
    actor TEXT NOT NULL, request_id TEXT, grant_id TEXT, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_request ON audit (request_id);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, host TEXT NOT NULL, sub TEXT NOT NULL, state TEXT NOT NULL,
    created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, version BIGINT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS commands_state ON commands (state, expires_at);
INSERT INTO meta (key, int_value) VALUES ('revision', 0) ON CONFLICT (key) DO NOTHING;
";

/// The state store: cheap to clone, shared by every request handler.
#[derive(Clone)]
pub struct Db {
    backend: Arc<Backend>,
}

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>, rusqlite::TransactionBehavior),
    Postgres {
        url: String,
        client: Mutex<Option<Box<PgConn>>>,
    },
}

/// A PostgreSQL connection and the statements prepared on it. Without the cache every
/// statement costs two round trips (prepare, then execute), which made the recordings
/// index the ingest's bottleneck; prepared statements live as long as the connection.
struct PgConn {
    client: postgres::Client,
    statements: std::collections::HashMap<String, postgres::Statement>,
}

impl PgConn {
    fn connect(url: &str) -> Result<Box<PgConn>, postgres::Error> {
        Ok(Box::new(PgConn {
            client: postgres::Client::connect(url, postgres::NoTls)?,
            statements: std::collections::HashMap::new(),
        }))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Postgres { client, .. } = self {
            // The blocking client ends its connection with its own runtime, which must not
            // happen on an async thread: let it go on a thread of its own.
            let client = client.get_mut().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(client) = client {
                let _ = std::thread::Builder::new()
                    .name("usher-pg-close".into())
                    .spawn(move || drop(client));
            }
        }
    }
}

impl Db {
    /// Opens (and if need be creates) the store `config` names; blocking.
    pub fn open(config: &StateConfig, data_dir: &Path) -> Result<Db, DbError> {
        let _ = std::fs::create_dir_all(data_dir);
        Db::open_with_schema(
            config,
            &data_dir.join("workflow.sqlite"),
            SQLITE_SCHEMA,
            POSTGRES_SCHEMA,
            7715001,
        )
    }

    /// Opens a database with its own schema (the recordings index uses this too): SQLite at
    /// `sqlite_path`, or the PostgreSQL `config` names, where instances starting at once
    /// run the schema one at a time under the advisory lock `schema_lock`.
    pub fn open_with_schema(
        config: &StateConfig,
        sqlite_path: &Path,
        sqlite_schema: &str,
        postgres_schema: &str,
        schema_lock: i64,
    ) -> Result<Db, DbError> {
        let backend = match config {
            StateConfig::Sqlite => {
                let conn = rusqlite::Connection::open(sqlite_path)?;
                conn.busy_timeout(std::time::Duration::from_secs(10))?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "FULL")?;
                conn.execute_batch(sqlite_schema)?;
                Backend::Sqlite(Mutex::new(conn), rusqlite::TransactionBehavior::Immediate)
            }
            StateConfig::Postgres { url } => {
                let mut client = postgres::Client::connect(url, postgres::NoTls)?;
                // Two instances starting at once both run the schema: serialise them.
                let mut tx = client.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&schema_lock])?;
                tx.batch_execute(postgres_schema)?;
                tx.commit()?;
                Backend::Postgres {
                    url: url.clone(),
                    client: Mutex::new(Some(Box::new(PgConn {
                        client,
                        statements: std::collections::HashMap::new(),
                    }))),
                }
            }
        };
        Ok(Db {
            backend: Arc::new(backend),
        })
    }

    /// A second connection to the same database, for reads: with SQLite its transactions
    /// are deferred (they read a snapshot and never wait for the writer's commit), with
    /// PostgreSQL it is a connection of its own. Writes through it are not serialised with
    /// the writer's: use it only to read.
    pub fn reader(&self, config: &StateConfig, sqlite_path: &Path) -> Result<Db, DbError> {
        let backend = match (&*self.backend, config) {
            (Backend::Sqlite(..), _) | (_, StateConfig::Sqlite) => {
                let conn = rusqlite::Connection::open(sqlite_path)?;
                conn.busy_timeout(std::time::Duration::from_secs(10))?;
                Backend::Sqlite(Mutex::new(conn), rusqlite::TransactionBehavior::Deferred)
            }
            (_, StateConfig::Postgres { url }) => Backend::Postgres {
                url: url.clone(),
                client: Mutex::new(Some(PgConn::connect(url)?)),
            },
        };
        Ok(Db {
            backend: Arc::new(backend),
        })
    }

    /// Runs `work` in one transaction (blocking). With PostgreSQL a broken connection is
    /// replaced, and the work is tried once more on the new one.
    pub fn transaction_blocking<T, E>(
        &self,
        mut work: impl FnMut(&mut dyn Tx) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<DbError>,
    {
        match &*self.backend {
            Backend::Sqlite(conn, behavior) => {
                let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                let tx = conn
                    .transaction_with_behavior(*behavior)
                    .map_err(DbError::from)?;
                let mut handle = SqliteTx(&tx);
                let out = work(&mut handle)?;
                tx.commit().map_err(DbError::from)?;
                Ok(out)
            }
            Backend::Postgres { url, client } => {
                let mut slot = client.lock().unwrap_or_else(|e| e.into_inner());
                for attempt in 0..2 {
                    if slot.as_ref().map(|c| c.client.is_closed()).unwrap_or(true) {
                        *slot = None;
                        match PgConn::connect(url) {
                            Ok(c) => *slot = Some(c),
                            Err(e) if attempt == 0 => {
                                log::warn!(target: "usher", "state store: reconnecting: {e}");
                                std::thread::sleep(std::time::Duration::from_millis(200));
                                continue;
                            }
                            Err(e) => return Err(DbError::from(e).into()),
                        }
                    }
                    let Some(c) = slot.as_mut() else { continue };
                    if attempt == 0 {
                        // A connection the server dropped shows only when used: probe it
                        // cheaply, and reconnect once if it is gone.
                        if let Err(e) = c.client.simple_query("") {
                            log::warn!(target: "usher", "state store: connection lost: {e}");
                            *slot = None;
                            continue;
                        }
                    }
                    let PgConn { client, statements } = &mut **c;
                    let tx = client.transaction().map_err(DbError::from)?;
                    let mut handle = PostgresTx {
                        tx: Some(tx),
                        statements,
                    };
                    let out = work(&mut handle);
                    let result = match (out, handle.tx.take()) {
                        (Ok(out), Some(tx)) => tx
                            .commit()
                            .map(|()| out)
                            .map_err(|e| E::from(DbError::from(e))),
                        (out, _) => out,
                    };
                    drop(handle);
                    if result.is_err() {
                        // A statement may have gone stale (another instance changed the
                        // schema): prepare afresh next time.
                        c.statements.clear();
                    }
                    return result;
                }
                Err(DbError::Corrupt("no connection to PostgreSQL".into()).into())
            }
        }
    }

    /// `transaction_blocking` off the async threads.
    pub async fn transaction<T, E>(
        &self,
        work: impl FnMut(&mut dyn Tx) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.transaction_blocking(work))
            .await
            .map_err(|e| E::from(DbError::Join(e.to_string())))?
    }

    pub fn is_postgres(&self) -> bool {
        matches!(&*self.backend, Backend::Postgres { .. })
    }
}

struct SqliteTx<'a>(&'a rusqlite::Transaction<'a>);

fn to_sqlite(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Real(r) => rusqlite::types::Value::Real(*r),
        Value::Text(t) => rusqlite::types::Value::Text(t.clone()),
    }
}

impl Tx for SqliteTx<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let n = stmt.execute(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match row.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                    rusqlite::types::ValueRef::Real(v) => Value::Real(v),
                    rusqlite::types::ValueRef::Text(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                    other => {
                        return Err(DbError::Corrupt(format!(
                            "unexpected column type {:?}",
                            other.data_type()
                        )))
                    }
                });
            }
            out.push(values);
        }
        Ok(out)
    }
}

/// Statements kept prepared per connection, at most.
const MAX_PREPARED: usize = 512;

struct PostgresTx<'a> {
    tx: Option<postgres::Transaction<'a>>,
    statements: &'a mut std::collections::HashMap<String, postgres::Statement>,
}

fn to_postgres(params: &[Value]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    params
        .iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match v {
                Value::Null => Box::new(Option::<String>::None),
                Value::Int(i) => Box::new(*i),
                Value::Real(r) => Box::new(*r),
                Value::Text(t) => Box::new(t.clone()),
            }
        })
        .collect()
}

impl<'a> PostgresTx<'a> {
    /// The transaction and `sql` prepared on its connection (once per connection).
    fn prepared(
        &mut self,
        sql: &str,
    ) -> Result<(&mut postgres::Transaction<'a>, postgres::Statement), DbError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| DbError::Corrupt("transaction already finished".into()))?;
        let statement = match self.statements.get(sql) {
            Some(s) => s.clone(),
            None => {
                // Searches build their SQL from the filters given: a bound on the shapes
                // kept, in case some caller ever builds it from values.
                if self.statements.len() >= MAX_PREPARED {
                    self.statements.clear();
                }
                let s = tx.prepare(sql)?;
                self.statements.insert(sql.to_string(), s.clone());
                s
            }
        };
        Ok((tx, statement))
    }
}

impl Tx for PostgresTx<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let boxed = to_postgres(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        let (tx, statement) = self.prepared(sql)?;
        Ok(tx.execute(&statement, &refs)?)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        use postgres::types::Type;
        let boxed = to_postgres(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        let (tx, statement) = self.prepared(sql)?;
        let rows = tx.query(&statement, &refs)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = Vec::with_capacity(row.len());
            for (i, column) in row.columns().iter().enumerate() {
                let t = column.type_();
                values.push(if *t == Type::INT8 {
                    row.try_get::<_, Option<i64>>(i)?
                        .map(Value::Int)
                        .unwrap_or(Value::Null)
                } else if *t == Type::INT4 {
                    row.try_get::<_, Option<i32>>(i)?
                        .map(|v| Value::Int(v.into()))
                        .unwrap_or(Value::Null)
                } else if *t == Type::FLOAT8 {
                    row.try_get::<_, Option<f64>>(i)?
                        .map(Value::Real)
                        .unwrap_or(Value::Null)
                } else if *t == Type::TEXT || *t == Type::VARCHAR {
                    row.try_get::<_, Option<String>>(i)?
                        .map(Value::Text)
                        .unwrap_or(Value::Null)
                } else {
                    return Err(DbError::Corrupt(format!("unexpected column type {t}")));
                });
            }
            out.push(values);
        }
        Ok(out)
    }
}
