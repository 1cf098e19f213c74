//! A small blocking HTTP server exposing a `Cluster`'s health, as the Go
//! guide's Kubernetes section does:
//!
//! - `GET /healthz`: the `HealthReport` as JSON (200, or 503 when unhealthy);
//! - `GET /readyz`: 200 when the primary answers within 2 s, else 503;
//! - `GET /metrics`: Prometheus text format.
//!
//! ```sh
//! cargo run --example http_health --features serde,prometheus
//! ```
//!
//! With `POSTGRES_HOST` set it uses `Cluster::from_env()`; otherwise it
//! starts a throw-away primary with one replica. It listens on
//! `PGXKIT_HTTP_ADDR` (default `127.0.0.1:8080`; port 0 picks a free one),
//! prints `listening on http://ADDR`, and stops gracefully on SIGTERM or
//! ctrl-c: it stops accepting requests, shuts the cluster down (running
//! operations may finish within 10 s, then the pools close) and exits 0.

use std::time::Duration;

use pgxkit::Cluster;
use pgxkit::testkit::LocalCluster;
use prometheus::{Encoder, Registry, TextEncoder};
use tiny_http::{Header, Response, Server};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = Registry::new();
    let mut _local = None;
    let builder = if std::env::var_os("POSTGRES_HOST").is_some() {
        pgxkit::ClusterBuilder::from_env()?
    } else {
        let local = LocalCluster::start(1)?;
        let builder = Cluster::builder()
            .primary(local.primary_dsn())
            .replica(local.replica_dsns()[0].clone());
        _local = Some(local);
        builder
    };
    let cluster = builder
        .health_check_period(Duration::from_secs(1))
        .prometheus(&registry)
        .build()?;

    let addr = std::env::var("PGXKIT_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let server = Server::http(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    println!("listening on http://{}", server.server_addr());

    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    })?;

    let json = Header::from_bytes("Content-Type", "application/json").expect("static header");
    let text =
        Header::from_bytes("Content-Type", "text/plain; version=0.0.4").expect("static header");
    while stop_rx.try_recv().is_err() {
        let Some(request) = server.recv_timeout(Duration::from_millis(100))? else {
            continue;
        };
        let response = match request.url() {
            "/healthz" => {
                let report = cluster.health();
                let code = if report.status == pgxkit::HealthStatus::Unhealthy {
                    503
                } else {
                    200
                };
                Response::from_string(serde_json::to_string(&report)?)
                    .with_status_code(code)
                    .with_header(json.clone())
            }
            "/readyz" => {
                if cluster.is_ready() {
                    Response::from_string("ready\n")
                } else {
                    Response::from_string("not ready\n").with_status_code(503)
                }
            }
            "/metrics" => {
                let mut body = Vec::new();
                TextEncoder::new().encode(&registry.gather(), &mut body)?;
                Response::from_data(body).with_header(text.clone())
            }
            _ => Response::from_string("not found\n").with_status_code(404),
        };
        if let Err(e) = request.respond(response) {
            eprintln!("could not answer a request: {e}");
        }
    }
    println!("shutting down");
    drop(server);
    let report = cluster.shutdown(Duration::from_secs(10));
    println!(
        "drained: {}, still running: {}",
        report.drained, report.still_running
    );
    Ok(())
}
