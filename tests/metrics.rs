//! Prometheus metrics after a known workload have the exact counts.
#![cfg(feature = "prometheus")]

mod common;

use std::time::Duration;

use common::builder_for;
use pgxkit::Cluster;
use pgxkit::testkit::LocalCluster;
use prometheus::{Encoder, Registry, TextEncoder};

fn scrape(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
fn a_known_workload_gives_exact_counts() {
    let local = LocalCluster::start(1).unwrap();
    let registry = Registry::new();
    let cluster = builder_for(&local)
        .max_conns(5)
        .health_check_period(Duration::from_millis(100))
        .prometheus(&registry)
        .build()
        .unwrap();
    common::wait_for_first_probe(&cluster);
    for i in 0..5 {
        cluster.execute("SELECT $1::int", &[&i]).unwrap();
    }
    for _ in 0..3 {
        cluster.query_one("SELECT 1", &[]).unwrap();
    }
    for _ in 0..2 {
        cluster.execute("SELEC 1", &[]).unwrap_err();
    }
    for _ in 0..4 {
        cluster.replica().query("SELECT 1", &[]).unwrap();
    }
    let text = scrape(&registry);
    for line in [
        r#"pgxkit_queries_total{operation="execute",route="primary",status="success"} 5"#,
        r#"pgxkit_queries_total{operation="execute",route="primary",status="error"} 2"#,
        r#"pgxkit_queries_total{operation="query_one",route="primary",status="success"} 3"#,
        r#"pgxkit_queries_total{operation="query",route="replica",status="success"} 4"#,
        r#"pgxkit_query_duration_seconds_count{operation="execute",route="primary",status="success"} 5"#,
        r#"pgxkit_query_duration_seconds_bucket{operation="execute",route="primary",status="success",le="+Inf"} 5"#,
        r#"pgxkit_checkout_wait_seconds_count{node="primary"} 10"#,
        r#"pgxkit_checkout_wait_seconds_count{node="replica1"} 4"#,
        r#"pgxkit_connections{node="primary",role="primary",state="max"} 5"#,
        r#"pgxkit_connections{node="primary",role="primary",state="acquired"} 0"#,
        r#"pgxkit_node_up{node="primary",role="primary"} 1"#,
        r#"pgxkit_node_up{node="replica1",role="replica"} 1"#,
        r#"pgxkit_breaker_state{node="replica1"} 0"#,
        r#"pgxkit_replica_lag_bytes{node="replica1"} 0"#,
    ] {
        assert!(has_line(&text, line), "missing `{line}` in:\n{text}");
    }
    // 20 buckets from 1 ms doubling, as in the guide.
    let buckets = text
        .lines()
        .filter(|l| {
            l.starts_with(
                r#"pgxkit_query_duration_seconds_bucket{operation="execute",route="primary",status="success""#,
            )
        })
        .count();
    assert_eq!(buckets, 21, "20 buckets plus +Inf");
    for bound in [r#"le="0.001""#, r#"le="524.288""#] {
        assert!(
            text.lines().any(|l| l.starts_with("pgxkit_query_duration_seconds_bucket") && l.contains(bound)),
            "no bucket {bound}"
        );
    }

    // A second cluster on the same registry is a named configuration error.
    let err = builder_for(&local)
        .prometheus(&registry)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), pgxkit::ErrorKind::Config);
    assert!(err.to_string().contains("prometheus"), "{err}");
}

#[test]
fn a_failed_build_leaves_the_registry_as_it_was() {
    let registry = prometheus::Registry::new();
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = Cluster::builder()
        .primary(format!(
            "postgres://postgres@127.0.0.1:{closed_port}/postgres?sslmode=disable"
        ))
        .prometheus(&registry)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), pgxkit::ErrorKind::Connect, "{err}");
    assert!(registry.gather().is_empty(), "registered by a failed build");
    // The retry, once the server is there, registers on the same registry.
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::builder()
        .primary(local.primary_dsn())
        .prometheus(&registry)
        .build()
        .unwrap();
    cluster.execute("SELECT 1", &[]).unwrap();
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    assert!(
        names.iter().any(|n| n == "pgxkit_queries_total"),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "pgxkit_node_up"), "{names:?}");
}
