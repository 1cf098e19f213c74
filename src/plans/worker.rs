//! The plan-capture worker: a thread that takes the queued slow
//! statements, runs `EXPLAIN` for each on the node it ran on, and hands the
//! plan to the handler (or logs it). It holds the nodes weakly and ends at
//! shutdown or when the cluster is gone.

use std::error::Error as StdError;
use std::sync::Weak;
use std::thread::{self, JoinHandle};

use crossbeam_channel::Receiver;
use postgres::GenericClient;
use postgres::types::{FromSql, ToSql, Type};

use super::{CapturedPlan, Job, Worker};
use crate::hooks;
use crate::info::Role;
use crate::node::Nodes;

/// A `json` value as its text (the binary form of `json` is the text).
pub(crate) struct JsonText(pub(crate) String);

impl<'a> FromSql<'a> for JsonText {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(JsonText(std::str::from_utf8(raw)?.to_owned()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON
    }
}

fn fetch_plan(
    client: &mut impl GenericClient,
    explain_sql: &str,
    types: &[Type],
    params: &[&(dyn ToSql + Sync)],
) -> Result<String, postgres::Error> {
    let statement = client.prepare_typed(explain_sql, types)?;
    let row = client.query_one(&statement, params)?;
    Ok(row.try_get::<_, JsonText>(0)?.0)
}

pub(crate) fn spawn(
    nodes: Weak<Nodes>,
    worker: Worker,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("pgxkit-plans".to_owned())
        .spawn(move || {
            // Ends at shutdown (stop disconnects) or when the cluster is gone.
            loop {
                let job = crossbeam_channel::select! {
                    recv(stop) -> _ => return,
                    recv(worker.jobs) -> job => match job {
                        Ok(job) => job,
                        Err(_) => return,
                    },
                };
                let Some(nodes) = nodes.upgrade() else {
                    return;
                };
                explain(&nodes, &worker, job);
            }
        })
}

fn explain(nodes: &Nodes, worker: &Worker, job: Job) {
    let Some(node) = nodes.nodes().find(|n| n.info.name() == job.node) else {
        return;
    };
    let analyze = worker.analyze_reads && job.route == Role::Replica;
    let explain_sql = if analyze {
        format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", job.sql)
    } else {
        format!("EXPLAIN (FORMAT JSON) {}", job.sql)
    };
    let params: Vec<&(dyn ToSql + Sync)> = job
        .params
        .iter()
        .map(|p| p as &(dyn ToSql + Sync))
        .collect();
    let result = node.call_bounded(None, |client| {
        if analyze {
            let mut tx = client.build_transaction().read_only(true).start()?;
            let plan = fetch_plan(&mut tx, &explain_sql, &job.types, &params);
            tx.rollback()?;
            plan
        } else {
            fetch_plan(&mut **client, &explain_sql, &job.types, &params)
        }
    });
    match result {
        Ok(json) => {
            let plan = CapturedPlan {
                node: node.info.clone(),
                kind: job.kind,
                route: job.route,
                sql: job.sql,
                duration: job.duration,
                analyzed: analyze,
                json,
            };
            match &worker.handler {
                Some(handler) => {
                    hooks::notify(std::slice::from_ref(handler), "on_plan", |h| h(&plan))
                }
                None => log::info!(
                    "plan of a slow {} on {} ({:?}): {}; sql={:?}",
                    plan.kind,
                    plan.node,
                    plan.duration,
                    plan.json,
                    plan.sql
                ),
            }
        }
        Err(e) => log::debug!("could not capture the plan of a slow statement: {e}"),
    }
}
