//! TLS on the listener (rustls, HTTP/2 or HTTP/1.1 by ALPN): clients reach a TLS cluster with the cluster's CA, requests
//! passed on between instances go over TLS too (and survive a kill -9 of the owner), a plain
//! HTTP client gets nothing, and a bad TLS setting refuses the start naming the file.
//! Certificates are made by the openssl command line for each run.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// curl with the cluster's CA: (status, parley-instance, JSON body).
fn curl(ca: &Path, method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String, Value) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20", "-D", "-", "-X", method, "--cacert"]).arg(ca).arg(url);
    if let Some(t) = token {
        c.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data", b]);
    }
    let out = c.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl {method} {url}: {}{text}", String::from_utf8_lossy(&out.stderr));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let instance = head.lines().find_map(|l| l.strip_prefix("parley-instance: ")).unwrap_or_default().trim().to_string();
    (status, instance, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_passes_on_and_fails_over_over_tls() {
    let data = Scratch::new("tls");
    let certs = Scratch::new("tls-certs");
    make_certificates(certs.path());
    let ca = certs.path().join("ca.pem");
    let config = data.deployment(&tls_deployment(certs.path()));
    let a = Server::start(data.path(), Some(&config));
    let b = Server::start(data.path(), Some(&config));
    let (url_a, url_b) = (format!("https://{}", a.addr), format!("https://{}", b.addr));

    let (status, _, _) = curl(&ca, "GET", &format!("{url_a}/healthz"), None, None);
    assert_eq!(status, 200);
    // ALPN: HTTP/2 for clients that offer it (browsers, curl), HTTP/1.1 for the others.
    let version = |flag: &str| {
        let out = Command::new("curl").args(["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_version}", flag, "--cacert"]).arg(&ca).arg(format!("{url_a}/healthz")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(version("--http2"), "2");
    assert_eq!(version("--http1.1"), "1.1");
    let (status, instance, created) = curl(&ca, "POST", &format!("{url_a}/v1/chats"), None, Some(r#"{"nickname":"Ann"}"#));
    assert_eq!((status, instance.as_str()), (201, a.id.as_str()), "{created}");
    let chat_id = created["chat_id"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();

    // Through B: passed on to A over TLS (B checks A's certificate against the CA).
    let messages_url = format!("{url_b}/v1/chats/{chat_id}/messages");
    let (status, instance, acked) = curl(&ca, "POST", &messages_url, Some(token), Some(r#"{"text":"over TLS, via B","client_msg_id":"t1"}"#));
    assert_eq!((status, instance.as_str()), (200, a.id.as_str()), "served by A through B: {acked}");
    let seq = acked["seq"].as_u64().unwrap();

    // A WebSocket over TLS to B, passed on to A over TLS: the transcript so far, then live.
    let proxied = || curl(&ca, "GET", &format!("{url_b}/v1/kpi"), None, None).2["requests_proxied"].as_u64().unwrap();
    let before = proxied();
    let mut ws = websocket_over_tls(&ca, &b.addr, &format!("/v1/chats/{chat_id}/ws?after=0&token={token}")).await;
    assert_eq!(next_message(&mut ws).await, (seq, "over TLS, via B".to_string()));
    assert_eq!(proxied(), before + 1, "B passed the WebSocket on to A");
    let (status, _, live) = curl(&ca, "POST", &format!("{url_a}/v1/chats/{chat_id}/messages"), Some(token), Some(r#"{"text":"live over wss","client_msg_id":"t1b"}"#));
    assert_eq!(status, 200, "{live}");
    let live_seq = live["seq"].as_u64().unwrap();
    assert_eq!(next_message(&mut ws).await, (live_seq, "live over wss".to_string()));

    // A plain HTTP client gets no answer from a TLS listener, and the listener goes on.
    let plain = Command::new("curl").args(["-sS", "--max-time", "5", &format!("http://{}/healthz", a.addr)]).output().unwrap();
    assert!(!plain.status.success(), "plain HTTP was answered: {}", String::from_utf8_lossy(&plain.stdout));
    // A client that does not trust the cluster's CA refuses the connection.
    let untrusted = Command::new("curl").args(["-sS", "--max-time", "5", &format!("{url_a}/healthz")]).output().unwrap();
    assert!(!untrusted.status.success(), "curl trusted a certificate it has no CA for");
    assert_eq!(curl(&ca, "GET", &format!("{url_a}/readyz"), None, None).0, 200);

    // kill -9 of the owner: B restores the chat; the acknowledged message is there once.
    a.kill9();
    let (status, instance, transcript) = curl(&ca, "GET", &format!("{url_b}/v1/chats/{chat_id}/transcript"), Some(token), None);
    assert_eq!((status, instance.as_str()), (200, b.id.as_str()), "{transcript}");
    assert_eq!(messages(&transcript), vec![(seq, "over TLS, via B".to_string()), (live_seq, "live over wss".to_string())]);
    let (status, _, again) = curl(&ca, "POST", &messages_url, Some(token), Some(r#"{"text":"after the kill","client_msg_id":"t2"}"#));
    assert_eq!(status, 200, "{again}");
    assert!(again["seq"].as_u64().unwrap() > live_seq);
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket to `path` on `addr` over TLS, trusting `ca` (ALPN http/1.1, as browsers open
/// WebSockets).
async fn websocket_over_tls(ca: &Path, addr: &str, path: &str) -> Wss {
    use tokio_rustls::rustls::{self, pki_types::{CertificateDer, ServerName, pem::PemObject}};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let host = ServerName::try_from(addr.rsplit_once(':').unwrap().0.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(host, tcp).await.expect("a TLS handshake");
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}{path}"), tls).await.expect("a WebSocket handshake over TLS");
    ws
}

/// The next message event on the socket: (seq, text).
async fn next_message(ws: &mut Wss) -> (u64, String) {
    use futures_util::StreamExt;
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.expect("an event within 10 s").expect("the socket is open").unwrap();
        let e: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if e["kind"] == "message" {
            return (e["seq"].as_u64().unwrap(), e["text"].as_str().unwrap().to_string());
        }
    }
}

#[test]
fn a_bad_tls_setting_refuses_the_start_naming_it() {
    let data = Scratch::new("tls-refuse");
    let certs = Scratch::new("tls-refuse-certs");
    make_certificates(certs.path());
    let dir = certs.path().display();
    let cases = [
        (format!("[server]\ntls_cert_file = \"{dir}/server.pem\"\n"), "server.tls_cert_file and server.tls_key_file go together"),
        (format!("[server]\ntls_cert_file = \"{dir}/server.pem\"\ntls_key_file = \"{dir}/missing.key\"\ntls_peer_ca_file = \"{dir}/ca.pem\"\n"), "missing.key"),
        (format!("[server]\ntls_cert_file = \"{dir}/server.ext\"\ntls_key_file = \"{dir}/server.key\"\ntls_peer_ca_file = \"{dir}/ca.pem\"\n"), "server.tls_cert_file"),
        (format!("[server]\ntls_cert_file = \"{dir}/server.pem\"\ntls_key_file = \"{dir}/ca.key\"\ntls_peer_ca_file = \"{dir}/ca.pem\"\n"), "do not make a usable certificate"),
        (format!("[server]\ntls_cert_file = \"{dir}/server.pem\"\ntls_key_file = \"{dir}/server.key\"\n"), "server.tls_peer_ca_file is needed"),
    ];
    for (toml, named) in cases {
        let (code, stderr) = Server::refuse(data.path(), &data.deployment(&toml));
        assert_ne!(code, 0, "started with {toml}");
        assert!(stderr.contains(named), "{toml}: the refusal names {named:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}
