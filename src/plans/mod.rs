//! Slow-query plan capture: a slow statement's plan is fetched by a
//! background worker with `EXPLAIN (FORMAT JSON)` on the same node.
//!
//! Better than the guide's sketch, which runs `EXPLAIN ANALYZE` on the
//! original statement and so executes a slow INSERT a second time: plain
//! `EXPLAIN` never executes anything, and `ANALYZE` (opt-in) is used only
//! for operations marked as reads, inside `BEGIN READ ONLY ... ROLLBACK`, so
//! the server itself refuses any write that slipped through.
//!
//! The caller never waits for this: the job goes into a bounded channel and
//! is dropped (and counted) when the channel is full.

mod worker;

#[cfg(feature = "testkit")]
pub(crate) use worker::JsonText;
pub(crate) use worker::spawn;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use postgres::Statement;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::hooks::OperationKind;
use crate::info::{NodeInfo, Role};

type PlanHandler = Arc<dyn Fn(&CapturedPlan) + Send + Sync>;

/// Settings for slow-query plan capture.
///
/// ```
/// use std::time::Duration;
/// use pgxkit::PlanCapture;
///
/// let builder = pgxkit::Cluster::builder().capture_slow_plans(
///     PlanCapture::new(Duration::from_millis(500))
///         .analyze_reads(true)
///         .on_plan(|plan| log::info!("{} took {:?}: {}", plan.sql(), plan.duration(), plan.json())),
/// );
/// ```
#[derive(Clone)]
pub struct PlanCapture {
    pub(crate) threshold: Duration,
    analyze_reads: bool,
    queue: usize,
    handler: Option<PlanHandler>,
}

impl fmt::Debug for PlanCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlanCapture")
            .field("threshold", &self.threshold)
            .field("analyze_reads", &self.analyze_reads)
            .field("queue", &self.queue)
            .field("handler", &self.handler.is_some())
            .finish()
    }
}

impl PlanCapture {
    /// Captures the plan of every statement that takes longer than `threshold`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let capture = pgxkit::PlanCapture::new(Duration::from_millis(250));
    /// ```
    pub fn new(threshold: Duration) -> Self {
        PlanCapture {
            threshold,
            analyze_reads: false,
            queue: 16,
            handler: None,
        }
    }

    /// Use `EXPLAIN ANALYZE` (which runs the statement again, read-only and
    /// rolled back) for calls through the read handle
    /// ([`Cluster::replica`](crate::Cluster::replica)). Defaults to `false`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let capture = pgxkit::PlanCapture::new(Duration::from_millis(250)).analyze_reads(true);
    /// ```
    pub fn analyze_reads(mut self, yes: bool) -> Self {
        self.analyze_reads = yes;
        self
    }

    /// How many plan jobs may wait; more are dropped. At least 1 (a 0 is
    /// taken as 1) and at most 100,000 (more fails `build()`). Defaults to 16.
    ///
    /// ```
    /// use std::time::Duration;
    /// let capture = pgxkit::PlanCapture::new(Duration::from_millis(250)).queue(64);
    /// ```
    pub fn queue(mut self, jobs: usize) -> Self {
        self.queue = jobs.max(1);
        self
    }

    pub(crate) fn queue_len(&self) -> usize {
        self.queue
    }

    /// Hands each plan to `handler` (on the worker thread) instead of
    /// logging it at `info` level.
    ///
    /// ```
    /// use std::time::Duration;
    /// let capture = pgxkit::PlanCapture::new(Duration::from_millis(250))
    ///     .on_plan(|plan| log::info!("{} took {:?}: {}", plan.sql(), plan.duration(), plan.json()));
    /// ```
    pub fn on_plan(mut self, handler: impl Fn(&CapturedPlan) + Send + Sync + 'static) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }
}

/// A slow statement's plan.
///
/// ```
/// use std::time::Duration;
/// let capture = pgxkit::PlanCapture::new(Duration::from_millis(250)).on_plan(|plan| {
///     log::info!(
///         "{} via {} on {} ({:?}, analyzed: {}): {}",
///         plan.kind(), plan.route(), plan.node(), plan.duration(), plan.analyzed(), plan.json()
///     );
/// });
/// ```
#[derive(Debug, Clone)]
pub struct CapturedPlan {
    node: NodeInfo,
    kind: OperationKind,
    route: Role,
    sql: String,
    duration: Duration,
    analyzed: bool,
    json: String,
}

impl CapturedPlan {
    /// The node the statement ran on (and was explained on).
    ///
    /// ```
    /// let capture = pgxkit::PlanCapture::new(std::time::Duration::from_millis(250))
    ///     .on_plan(|plan| log::debug!("node: {:?}", plan.node()));
    /// ```
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }
    /// The operation.
    ///
    /// ```
    /// let capture = pgxkit::PlanCapture::new(std::time::Duration::from_millis(250))
    ///     .on_plan(|plan| log::debug!("kind: {:?}", plan.kind()));
    /// ```
    pub fn kind(&self) -> OperationKind {
        self.kind
    }
    /// How it was routed: [`Role::Replica`] through the read handle.
    ///
    /// ```
    /// let capture = pgxkit::PlanCapture::new(std::time::Duration::from_millis(250))
    ///     .on_plan(|plan| log::debug!("route: {:?}", plan.route()));
    /// ```
    pub fn route(&self) -> Role {
        self.route
    }
    /// The statement.
    ///
    /// ```
    /// let capture = pgxkit::PlanCapture::new(std::time::Duration::from_millis(250))
    ///     .on_plan(|plan| log::debug!("sql: {:?}", plan.sql()));
    /// ```
    pub fn sql(&self) -> &str {
        &self.sql
    }
    /// How long the statement took.
    ///
    /// ```
    /// let capture = pgxkit::PlanCapture::new(std::time::Duration::from_millis(250))
    ///     .on_plan(|plan| log::debug!("duration: {:?}", plan.duration()));
    /// ```
    pub fn duration(&self) -> Duration {
        self.duration
    }
    /// Whether the plan comes from `EXPLAIN ANALYZE`.
    ///
    /// ```
    /// let capture = pgxkit::PlanCapture::new(std::time::Duration::from_millis(250))
    ///     .on_plan(|plan| log::debug!("analyzed: {:?}", plan.analyzed()));
    /// ```
    pub fn analyzed(&self) -> bool {
        self.analyzed
    }
    /// The plan, as `EXPLAIN (FORMAT JSON)` returns it.
    ///
    /// ```
    /// let capture = pgxkit::PlanCapture::new(std::time::Duration::from_millis(250))
    ///     .on_plan(|plan| log::debug!("json: {:?}", plan.json()));
    /// ```
    pub fn json(&self) -> &str {
        &self.json
    }
}

/// A statement parameter already encoded in the binary format of its type.
#[derive(Debug)]
struct Encoded(Option<Vec<u8>>);

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match &self.0 {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

pub(crate) struct Job {
    node: String,
    kind: OperationKind,
    route: Role,
    sql: String,
    types: Vec<Type>,
    params: Vec<Encoded>,
    duration: Duration,
}

/// The caller's side: decides what is slow and queues jobs.
pub(crate) struct Capture {
    pub(crate) threshold: Duration,
    jobs: Sender<Job>,
    pub(crate) dropped: AtomicU64,
}

/// The worker's side: the queue and what to do with each plan.
pub(crate) struct Worker {
    jobs: Receiver<Job>,
    analyze_reads: bool,
    handler: Option<PlanHandler>,
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

impl Capture {
    pub(crate) fn new(settings: &PlanCapture) -> (Capture, Worker) {
        let (jobs, rx) = crossbeam_channel::bounded(settings.queue);
        let capture = Capture {
            threshold: settings.threshold,
            jobs,
            dropped: AtomicU64::new(0),
        };
        let worker = Worker {
            jobs: rx,
            analyze_reads: settings.analyze_reads,
            handler: settings.handler.clone(),
        };
        (capture, worker)
    }

    /// Queues a plan job for a slow statement; never blocks.
    pub(crate) fn offer(
        &self,
        node: &NodeInfo,
        (kind, route): (OperationKind, Role),
        statement: &Statement,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        duration: Duration,
    ) {
        let types = statement.params().to_vec();
        let mut encoded = Vec::with_capacity(params.len());
        for (param, ty) in params.iter().zip(&types) {
            let mut buf = BytesMut::new();
            match param.to_sql_checked(ty, &mut buf) {
                Ok(IsNull::No) => encoded.push(Encoded(Some(buf.to_vec()))),
                Ok(IsNull::Yes) => encoded.push(Encoded(None)),
                Err(_) => return, // the statement itself would have failed
            }
        }
        let job = Job {
            node: node.name().to_owned(),
            kind,
            route,
            sql: sql.to_owned(),
            types,
            params: encoded,
            duration,
        };
        if let Err(TrySendError::Full(_)) = self.jobs.try_send(job) {
            self.dropped.fetch_add(1, Relaxed);
            log::debug!("plan capture queue full; a slow statement's plan was not captured");
        }
    }
}
