#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod api;
mod balancer;
mod breaker;
mod cluster;
mod config;
mod copy;
mod deadline;
mod dsn;
mod env;
mod error;
mod exec;
mod health;
pub mod hooks;
mod info;
mod limits;
mod lsn;
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub mod metrics;
mod monitor;
mod node;
mod node_handle;
mod pgpass;
mod plans;
mod pool;
mod replica;
mod retry;
mod rows;
mod session;
mod settings;
mod shutdown;
mod socket;
mod ssl_status;
mod statements;
mod stats;
mod stripes;
mod sync;
mod tls;
mod topology;
mod tx;

#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

pub use api::{Reads, Writes};
pub use balancer::ReadBalance;
pub use breaker::BreakerState;
pub use cluster::Cluster;
pub use config::ClusterBuilder;
pub use dsn::{SslMode, parse_duration, redact_dsn};
pub use env::{dsn_from_env, dsn_from_env_with};
pub use error::{AsPgxkitError, Error, ErrorKind, Result};
pub use health::{HealthReport, HealthStatus, NodeHealth};
pub use hooks::{AfterOperation, BeforeOperation, HookResult, OperationKind};
pub use info::{NodeInfo, Role};
pub use node_handle::NodeHandle;
pub use plans::{CapturedPlan, PlanCapture};
pub use replica::ReplicaHandle;
pub use retry::{RetryPolicy, retry};
pub use rows::RowIter;
pub use session::Session;
pub use settings::ReadFallback;
pub use shutdown::ShutdownReport;
pub use ssl_status::SslStatus;
pub use statements::StatementMode;
pub use stats::{ClusterStats, NodeStats, PoolStats};
pub use tx::{IsolationLevel, RetryingTransaction, Transaction, TransactionBuilder};

/// The driver's types that appear in pgxkit's API.
pub use postgres::{self, Row, types::ToSql};
