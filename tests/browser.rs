//! The customer widget and the agent console in a real browser (Debian's Chromium, headless,
//! driven by playwright-core from tests/browser/failover.mjs) against a real three-instance
//! cluster: they chat, the owner is killed with SIGKILL mid-chat, both pages go on. The pages'
//! transcripts are then compared with the server's, and the screenshots are kept in
//! target/browser-artifacts/.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";

/// playwright-core from npm, installed from the lock file the first time.
fn playwright() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/playwright-core/package.json").exists() {
        let ok = Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir).status().map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "npm ci in tests/browser failed ({ok:?}): Node.js and npm are needed for the browser tests");
    }
    dir
}

/// (seq, text) of each message, in the order given.
fn shown_messages(items: &Value) -> Vec<(u64, String)> {
    items.as_array().unwrap().iter().filter(|i| i["kind"] == "message").map(|i| (i["seq"].as_u64().unwrap_or(0), i["text"].as_str().unwrap().to_string())).collect()
}

/// The screenshots failover.mjs saves before, during and after the failover.
const FAILOVER_SHOTS: [&str; 6] = ["customer-1-before-failover", "agent-1-before-failover", "customer-2-reconnecting", "agent-2-reconnecting", "customer-3-after-failover", "agent-3-after-failover"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_and_console_carry_on_through_a_kill_9_of_the_owner() {
    let artifacts = artifacts();
    // Only this run's screenshots count (the other scenarios save theirs beside them meanwhile).
    for name in FAILOVER_SHOTS {
        let _ = std::fs::remove_file(artifacts.join(format!("{name}.png")));
    }
    let data = Scratch::new("browser");
    let servers: Vec<Server> = (0..3).map(|_| Server::start(data.path(), None)).collect();
    let result = data.path().join("browser-result.json");
    let instances: Vec<Value> = servers.iter().map(|s| serde_json::json!({"id": s.id, "url": format!("http://{}", s.addr), "pid": s.pid()})).collect();
    let input = serde_json::json!({"instances": instances, "agent_token": AGENT, "artifacts": artifacts, "result": result});

    run_script("failover.mjs", input, None).await;

    let shown: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    let owner = shown["owner"].as_str().unwrap();
    assert_eq!(owner, servers[0].id, "the chat was created on the first instance the page lists");
    let restored_on = shown["restored_on"].as_str().unwrap();
    let survivor = servers.iter().find(|s| s.id == restored_on).expect("restored on an instance of the cluster");
    assert_ne!(survivor.id, owner);

    // What the server saved, read through the instance that holds the chat now.
    let chat_id = shown["chat_id"].as_str().unwrap();
    let token = shown["customer_token"].as_str().unwrap();
    let transcript = survivor.client().get(&format!("/v1/chats/{chat_id}/transcript"), Some(token)).await.unwrap().ok().unwrap();
    let saved = messages(&transcript);
    let sent: Vec<String> = shown["sent"].as_array().unwrap().iter().map(|p| p[1].as_str().unwrap().to_string()).collect();
    assert_eq!(saved.len(), sent.len(), "every message typed is in the transcript once: {saved:?}");
    for text in &sent {
        assert_eq!(saved.iter().filter(|(_, t)| t == text).count(), 1, "{text:?} saved exactly once: {saved:?}");
    }

    // Both pages show exactly the saved messages, in the saved order, each one once, each
    // with its seq (placed in the transcript), own ones acknowledged.
    for page in ["customer", "agent"] {
        let items = &shown["shown"][page];
        assert_eq!(shown_messages(items), saved, "the {page} page shows the transcript as saved");
        for item in items.as_array().unwrap().iter().filter(|i| i["kind"] == "message") {
            let expected = if item["mine"] == true { "sent" } else { "received" };
            assert_eq!(item["state"], expected, "{page} page: {item}");
        }
        let moved = items.as_array().unwrap().iter().filter(|i| i["kind"] == "moved").count();
        assert_eq!(moved, 1, "the {page} page shows the restore once: {items}");
        let status = shown["status"][page].as_str().unwrap();
        assert!(status.contains(restored_on), "the {page} page names the new instance: {status}");
    }
    // Typed during the outage: delivered after the restore, after everything before it.
    let moved_seq = transcript["events"].as_array().unwrap().iter().find(|e| e["kind"] == "moved").expect("a moved event")["seq"].as_u64().unwrap();
    for text in &sent[6..8] {
        let (seq, _) = saved.iter().find(|(_, t)| t == text).unwrap();
        assert!(*seq > moved_seq, "{text:?} (seq {seq}) was saved by the new owner, after the moved event ({moved_seq})");
    }

    for name in FAILOVER_SHOTS {
        let png = std::fs::read(artifacts.join(format!("{name}.png"))).unwrap_or_default();
        assert!(png.len() > 10_000 && png.starts_with(b"\x89PNG"), "screenshot {name}.png saved ({} bytes)", png.len());
    }
}

/// An agent with more chats than a browser opens HTTP/1.1 connections to one origin
/// (tests/browser/busy-agent.mjs): every customer's message arrives and every answer is
/// acknowledged within 5 s — over plain HTTP/1.1 (events over WebSockets) and over HTTPS
/// (HTTP/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_eight_chats_gets_and_answers_each_at_once() {
    let data = Scratch::new("busy-agent");
    let server = Server::start(data.path(), None);
    busy_agent(&format!("http://{}", server.addr), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_eight_chats_over_https_gets_and_answers_each_at_once() {
    let certs = Scratch::new("busy-agent-certs");
    make_certificates(certs.path());
    let data = Scratch::new("busy-agent-tls");
    let config = data.deployment(&tls_deployment(certs.path()));
    let server = Server::start(data.path(), Some(&config));
    busy_agent(&format!("https://{}", server.addr), Some(&certs.path().join("ca.pem"))).await;
}

/// Runs busy-agent.mjs against the instance at `url`; `ca`: the CA its certificate is signed by.
async fn busy_agent(url: &str, ca: Option<&Path>) {
    let input = serde_json::json!({"url": url, "agent_token": AGENT, "artifacts": artifacts(), "chats": 8});
    run_script("busy-agent.mjs", input, ca).await;
}

/// Where the scripts save their screenshots.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs one script of tests/browser in node (Chromium through playwright-core) with `input`
/// as PARLEY_BROWSER_TEST and, if given, `ca` trusted by the script's own requests; it must
/// succeed within 4 minutes.
async fn run_script(script: &str, input: Value, ca: Option<&Path>) {
    assert!(Path::new(CHROMIUM).exists(), "the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)");
    let mut node = Command::new("node");
    node.arg(script).current_dir(playwright()).env("PARLEY_BROWSER_TEST", input.to_string());
    if let Some(ca) = ca {
        node.env("NODE_EXTRA_CA_CERTS", ca);
    }
    let run = tokio::task::spawn_blocking(move || node.output().expect("run node"));
    let out = tokio::time::timeout(std::time::Duration::from_secs(240), run).await.expect("the browser test finished within 4 minutes").unwrap();
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{printed}");
    assert!(out.status.success(), "the browser script {script} failed: {printed}");
}
