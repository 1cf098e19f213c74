//! How statements reach the server: a per-connection LRU cache of prepared
//! statements (the default: one round trip per execution once prepared),
//! unnamed statements in one round trip (for PgBouncer in transaction
//! pooling mode, where named statements break), or the simple protocol.

use std::collections::HashMap;

use rustc_hash::FxBuildHasher;

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{Client, Row, Statement};

/// Statement parameters as every call takes them (`$1`, `$2`, ... bound in
/// order, as in `postgres`).
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// How parameterised operations reach the server.
///
/// ```
/// use pgxkit::StatementMode;
/// let builder = pgxkit::Cluster::builder()
///     .primary("postgres://app@pgbouncer:6432/app")
///     .statement_mode(StatementMode::Unnamed); // PgBouncer, transaction pooling
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum StatementMode {
    /// Prepare each distinct SQL text once per connection and keep it in an
    /// LRU cache ([`statement_cache_capacity`](crate::ClusterBuilder::statement_cache_capacity));
    /// later executions cost one round trip. A cached statement made stale
    /// by a schema change (SQLSTATE 0A000 "cached plan must not change result
    /// type") or gone from the server (26000) is prepared again, once,
    /// transparently. The default.
    #[default]
    Cached,
    /// Unnamed statements, parsed, bound and executed in one round trip
    /// (`query_typed`): nothing lives on the server between statements, so
    /// it works behind PgBouncer in transaction pooling mode. Parameter types
    /// are taken from the Rust values (`i32` is `int4`, `&str` is `text`, ...),
    /// not inferred by the server.
    Unnamed,
    /// The simple query protocol: one round trip, text results, no
    /// parameters (a statement with parameters is an error).
    Simple,
}

/// Whether a failure means the cached statement must be prepared again:
/// its result type changed under it, or the server no longer knows it.
pub(crate) fn is_stale(err: &postgres::Error) -> bool {
    match err.as_db_error() {
        Some(db) => {
            (*db.code() == SqlState::FEATURE_NOT_SUPPORTED
                && db.message().contains("cached plan must not change"))
                || *db.code() == SqlState::INVALID_SQL_STATEMENT_NAME
        }
        None => false,
    }
}

/// A connection's prepared statements, least recently used evicted first.
/// Evicting drops the `Statement`, which closes it on the server.
#[derive(Debug)]
pub(crate) struct StatementCache {
    // SQL text is not attacker-chosen per call, so a fast hash will do
    // (SipHash cost ~190 instructions per lookup here).
    entries: HashMap<String, (Statement, u64), FxBuildHasher>,
    tick: u64,
    capacity: usize,
}

impl StatementCache {
    pub(crate) fn new(capacity: usize) -> Self {
        StatementCache {
            entries: HashMap::default(),
            tick: 0,
            capacity,
        }
    }

    fn get(&mut self, sql: &str) -> Option<Statement> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(sql).map(|(statement, used)| {
            *used = tick;
            statement.clone()
        })
    }

    fn insert(&mut self, sql: &str, statement: Statement) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(sql) {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.tick += 1;
        self.entries.insert(sql.to_owned(), (statement, self.tick));
    }

    fn remove(&mut self, sql: &str) {
        self.entries.remove(sql);
    }

    /// The statement for `sql`, from the cache or prepared now; the flag
    /// says whether it was a cache hit.
    pub(crate) fn prepare(
        &mut self,
        client: &mut Client,
        sql: &str,
    ) -> Result<(Statement, bool), postgres::Error> {
        if let Some(statement) = self.get(sql) {
            return Ok((statement, true));
        }
        self.prepare_new(client, sql).map(|s| (s, false))
    }

    /// A cache miss: prepares `sql` on the server and caches it. Out of
    /// line, so the hit path stays short.
    #[cold]
    #[inline(never)]
    fn prepare_new(
        &mut self,
        client: &mut Client,
        sql: &str,
    ) -> Result<Statement, postgres::Error> {
        let statement = client.prepare(sql)?;
        self.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs `run` with the cached statement for `sql`; if the statement
    /// turns out stale, prepares it again and runs once more (the failed
    /// execution did not run: the server refused it at bind time).
    pub(crate) fn run<T>(
        &mut self,
        client: &mut Client,
        sql: &str,
        run: impl Fn(&mut Client, &Statement) -> Result<T, postgres::Error>,
    ) -> Result<(T, Statement, bool), postgres::Error> {
        let (statement, hit) = self.prepare(client, sql)?;
        match run(client, &statement) {
            Err(e) if hit && is_stale(&e) => self.rerun(client, sql, e, run),
            other => other.map(|v| (v, statement, hit)),
        }
    }

    /// [`run`](Self::run) after the server called the cached statement
    /// stale (`err`): evicts it, prepares it again and runs once more.
    #[cold]
    #[inline(never)]
    fn rerun<T>(
        &mut self,
        client: &mut Client,
        sql: &str,
        err: postgres::Error,
        run: impl Fn(&mut Client, &Statement) -> Result<T, postgres::Error>,
    ) -> Result<(T, Statement, bool), postgres::Error> {
        log::debug!("re-preparing a stale cached statement: {err}");
        self.remove(sql);
        let statement = self.prepare_new(client, sql)?;
        run(client, &statement).map(|v| (v, statement, false))
    }
}

/// Types to try, in order, for a parameter in `Unnamed` mode.
const CANDIDATES: &[Type] = &[
    Type::INT4,
    Type::INT8,
    Type::TEXT,
    Type::BOOL,
    Type::FLOAT8,
    Type::INT2,
    Type::FLOAT4,
    Type::BYTEA,
    Type::OID,
    Type::CHAR,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::TIME,
    Type::UUID,
    Type::JSONB,
    Type::NUMERIC,
    Type::INET,
    Type::INTERVAL,
    Type::INT4_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::BOOL_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::BYTEA_ARRAY,
    Type::UUID_ARRAY,
];

/// The PostgreSQL type of each parameter, from the Rust value: the first
/// candidate type the value's `ToSql` accepts. `Err(n)` for the 1-based
/// position of a parameter no candidate fits.
pub(crate) fn infer_types(params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Type>, usize> {
    let mut scratch = bytes::BytesMut::new();
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            CANDIDATES
                .iter()
                .find(|ty| {
                    scratch.clear();
                    p.to_sql_checked(ty, &mut scratch).is_ok()
                })
                .cloned()
                .ok_or(i + 1)
        })
        .collect()
}

/// What an operation asks of a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// Rows affected.
    Execute,
    /// Rows returned.
    Query,
    /// At most one row returned, streamed: no `Vec` of rows, and the rows
    /// past the second are never decoded.
    QueryOpt,
}

/// What a statement gave back.
#[derive(Debug)]
pub(crate) enum Output {
    Count(u64),
    Rows(Vec<Row>),
    /// From [`Call::QueryOpt`]: no row or one.
    Opt(Option<Row>),
    /// From [`Call::QueryOpt`]: more than one row.
    TooMany,
}

impl Output {
    /// Rows affected or returned.
    pub(crate) fn len(&self) -> u64 {
        match self {
            Output::Count(n) => *n,
            Output::Rows(rows) => rows.len() as u64,
            Output::Opt(row) => u64::from(row.is_some()),
            Output::TooMany => 2,
        }
    }

    pub(crate) fn count(self) -> u64 {
        self.len()
    }

    pub(crate) fn rows(self) -> Vec<Row> {
        match self {
            Output::Rows(rows) => rows,
            Output::Opt(row) => row.into_iter().collect(),
            Output::Count(_) | Output::TooMany => Vec::new(),
        }
    }

    /// At most one row: `Err(())` when more than one came.
    pub(crate) fn opt(self) -> Result<Option<Row>, ()> {
        match self {
            Output::Rows(mut rows) if rows.len() <= 1 => Ok(rows.pop()),
            Output::Rows(_) | Output::TooMany => Err(()),
            Output::Opt(row) => Ok(row),
            Output::Count(_) => Ok(None),
        }
    }
}

impl Call {
    /// With a prepared statement.
    pub(crate) fn run(
        self,
        client: &mut Client,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Output, postgres::Error> {
        match self {
            Call::Execute => client.execute(statement, params).map(Output::Count),
            Call::Query => client.query(statement, params).map(Output::Rows),
            Call::QueryOpt => match client.query_opt(statement, params) {
                Ok(row) => Ok(Output::Opt(row)),
                Err(e) if is_row_count(&e) => Ok(Output::TooMany),
                Err(e) => Err(e),
            },
        }
    }

    /// As an unnamed statement in one round trip.
    pub(crate) fn run_unnamed(
        self,
        client: &mut Client,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        types: &[Type],
    ) -> Result<Output, postgres::Error> {
        let typed: Vec<(&(dyn ToSql + Sync), Type)> =
            params.iter().copied().zip(types.iter().cloned()).collect();
        match self {
            Call::Execute => client.execute_typed(sql, &typed).map(Output::Count),
            Call::Query | Call::QueryOpt => client.query_typed(sql, &typed).map(Output::Rows),
        }
    }
}

/// Whether `e` is the driver's "more than one row" from `query_opt`. Its kind
/// is private; it is the only error with this text, no server error and no
/// cause (tests/cluster.rs `query_one_and_query_opt_count_rows` fails if a
/// driver update changes that).
fn is_row_count(e: &postgres::Error) -> bool {
    use std::error::Error as _;
    e.as_db_error().is_none()
        && e.source().is_none()
        && e.to_string() == "query returned an unexpected number of rows"
}

/// Runs a statement with the simple protocol; returns the rows affected.
pub(crate) fn execute_simple(client: &mut Client, sql: &str) -> Result<Output, postgres::Error> {
    let messages = client.simple_query(sql)?;
    let affected = messages
        .iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .sum();
    Ok(Output::Count(affected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_come_from_the_rust_values() {
        let (a, b, c, d, e): (i32, i64, &str, bool, Option<f64>) = (1, 2, "x", true, None);
        let v: Vec<u8> = vec![1];
        let types = infer_types(&[&a, &b, &c, &d, &e, &v]).unwrap();
        assert_eq!(
            types,
            [
                Type::INT4,
                Type::INT8,
                Type::TEXT,
                Type::BOOL,
                Type::FLOAT8,
                Type::BYTEA
            ]
        );
    }

    #[test]
    fn an_unknown_type_names_its_position() {
        #[derive(Debug)]
        struct Odd;
        impl ToSql for Odd {
            fn to_sql(
                &self,
                _: &Type,
                _: &mut bytes::BytesMut,
            ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
            {
                Ok(postgres::types::IsNull::Yes)
            }
            fn accepts(ty: &Type) -> bool {
                *ty == Type::POINT
            }
            postgres::types::to_sql_checked!();
        }
        assert_eq!(infer_types(&[&1i32, &Odd]), Err(2));
    }
}
