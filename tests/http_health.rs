//! Runs `examples/http_health` as a real process, fetches its three
//! endpoints, and stops it with SIGTERM.
#![cfg(all(feature = "serde", feature = "prometheus"))]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn example_binary() -> PathBuf {
    // target/debug/deps/http_health-HASH -> target/debug/examples/http_health
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("http_health")
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_example_serves_health_readiness_and_metrics_and_stops_on_sigterm() {
    let binary = example_binary();
    assert!(
        binary.exists(),
        "{} is missing: the full `cargo test --all-features` builds it (or `cargo build --example http_health --all-features`)",
        binary.display()
    );
    let mut child = Command::new(&binary)
        .env("PGXKIT_HTTP_ADDR", "127.0.0.1:0")
        .env_remove("POSTGRES_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .expect(&line)
        .to_owned();

    let (status, body) = get(&addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        json["status"] == "healthy" || json["status"] == "degraded",
        "{json}"
    );
    assert_eq!(json["database"]["connected"], true);
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_owned()));
    let (status, metrics) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"pgxkit_node_up{node="primary",role="primary"} 1"#),
        "{metrics}"
    );
    assert_eq!(get(&addr, "/nope").0, 404);

    nix_kill(child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the example did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("shutting down") && rest.contains("drained: true"),
        "{rest}"
    );
}

fn nix_kill(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
