//! Test harness: starts the real `parley` binary on a free port with its own data directory,
//! and kills it with SIGKILL when asked (or when dropped).

#![allow(dead_code)]

pub mod scenarios;

use parley::client::Client;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const AGENT: &str = "test-agent-token";
pub const ADMIN: &str = "test-admin-token";

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("parley-test-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// Writes a deployment file and returns its path.
    pub fn deployment(&self, toml: &str) -> PathBuf {
        let p = self.0.join("deployment.toml");
        std::fs::write(&p, toml).unwrap();
        p
    }
    /// One integer from the database of an instance on this directory, read beside it.
    pub fn read_integer(&self, sql: &str, params: impl rusqlite::Params) -> i64 {
        let db = rusqlite::Connection::open(self.0.join("parley.db")).unwrap();
        db.query_row(sql, params, |r| r.get(0)).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Server {
    child: Child,
    pub addr: String,
    /// The instance id it printed at startup.
    pub id: String,
}

fn command(data: &Path, config: Option<&Path>, listen: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_parley"));
    c.args(["serve", "--listen", listen, "--data"]).arg(data);
    if let Some(cfg) = config {
        c.arg("--config").arg(cfg);
    }
    c.env("PARLEY_AGENT_TOKEN", AGENT).env("PARLEY_ADMIN_TOKEN", ADMIN).env("PARLEY_LOG", "warn");
    c
}

impl Server {
    pub fn start(data: &Path, config: Option<&Path>) -> Server {
        Self::start_at(data, config, "127.0.0.1:0")
    }

    pub fn start_at(data: &Path, config: Option<&Path>, listen: &str) -> Server {
        let mut c = command(data, config, listen);
        c.stderr(Stdio::inherit());
        Self::spawn(c)
    }

    fn spawn(mut c: Command) -> Server {
        let mut child = c.stdout(Stdio::piped()).spawn().expect("spawn parley");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("parley printed nothing").unwrap();
        let url = line.split("listening on ").nth(1).unwrap_or_else(|| panic!("unexpected first line: {line}"));
        let addr = url.trim().trim_start_matches("https://").trim_start_matches("http://").to_string();
        let id = line.split_whitespace().nth(2).unwrap_or_default().to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr, id }
    }

    /// Like `start_at`, logging JSON lines at info level into `log` (for event ids).
    pub fn start_logged(data: &Path, config: Option<&Path>, log: &Path) -> Server {
        let mut c = command(data, config, "127.0.0.1:0");
        c.arg("--log-json").env("PARLEY_LOG", "info").stderr(std::fs::File::create(log).unwrap());
        Self::spawn(c)
    }

    /// Runs `parley serve` expecting it to refuse to start; returns (exit code, stderr). One that
    /// is still running after 30 s started instead: it is killed, and the code is -1.
    pub fn refuse(data: &Path, config: &Path) -> (i32, String) {
        let mut child = command(data, Some(config), "127.0.0.1:0").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn parley");
        let started = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn client(&self) -> Client {
        Client::new(&self.addr)
    }

    /// SIGKILL, as `kill -9` would.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP: the process freezes (its lease stops being renewed) until `resume`. SIGKILL
    /// (on drop) ends a frozen process too.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGTERM: drain, then hand the remaining chats over and exit.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Waits for the process to exit by itself; its exit code.
    pub async fn exited(mut self) -> i32 {
        let status = tokio::task::spawn_blocking(move || self.child.wait().unwrap()).await.unwrap();
        status.code().unwrap_or(-1)
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let ok = Command::new("kill").arg(which).arg(self.child.id().to_string()).status().unwrap().success();
        assert!(ok, "kill {which} failed");
    }

    pub async fn kpi(&self) -> Value {
        self.client().get("/v1/kpi", None).await.unwrap().ok().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An instance's `GET /metrics`, the Prometheus text as a scraper reads it.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// A loopback address nothing listens on yet, for an instance started later.
pub fn spare_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A participant of one chat, with its own connection.
pub struct Participant {
    pub client: Client,
    pub chat_id: String,
    pub id: String,
    pub token: String,
}

impl Participant {
    pub async fn send(&mut self, text: &str, client_msg_id: &str) -> parley::client::Reply {
        let path = format!("/v1/chats/{}/messages", self.chat_id);
        self.client.post(&path, Some(&self.token), json!({"text": text, "client_msg_id": client_msg_id})).await.unwrap()
    }

    pub async fn transcript(&mut self) -> Value {
        let path = format!("/v1/chats/{}/transcript", self.chat_id);
        self.client.get(&path, Some(&self.token)).await.unwrap().ok().unwrap()
    }

    pub async fn events(&mut self, after: u64, wait_ms: u64) -> Value {
        let path = format!("/v1/chats/{}/events?after={after}&wait_ms={wait_ms}", self.chat_id);
        self.client.get(&path, Some(&self.token)).await.unwrap().ok().unwrap()
    }

    pub fn moved_to(&mut self, server: &Server) {
        self.client = server.client();
    }
}

/// Opens a chat as a customer and has an agent join it.
pub async fn open_chat(server: &Server, nickname: &str) -> (Participant, Participant) {
    let mut c = server.client();
    let created = c.post("/v1/chats", None, json!({"nickname": nickname, "subject": "test"})).await.unwrap().ok().unwrap();
    let chat_id = created["chat_id"].as_str().unwrap().to_string();
    let mut a = server.client();
    let joined = a.post(&format!("/v1/chats/{chat_id}/join"), Some(AGENT), json!({"nickname": "Agent Smith"})).await.unwrap().ok().unwrap();
    let customer = Participant { client: c, chat_id: chat_id.clone(), id: created["participant_id"].as_str().unwrap().into(), token: created["token"].as_str().unwrap().into() };
    let agent = Participant { client: a, chat_id, id: joined["participant_id"].as_str().unwrap().into(), token: joined["token"].as_str().unwrap().into() };
    (customer, agent)
}

/// The (seq, text) of every message event in a transcript or events answer.
pub fn messages(events: &Value) -> Vec<(u64, String)> {
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| (e["seq"].as_u64().unwrap(), e["text"].as_str().unwrap().to_string()))
        .collect()
}

pub fn kinds(events: &Value) -> Vec<String> {
    events["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect()
}

/// Starts a long poll for `p`'s events after `after` on its own connection; resolves with its answer.
pub fn poll_in_background(server: &Server, p: &Participant, after: u64) -> tokio::task::JoinHandle<Value> {
    let path = format!("/v1/chats/{}/events?after={after}&wait_ms=10000", p.chat_id);
    let token = p.token.clone();
    let mut c = server.client();
    tokio::spawn(async move { c.get(&path, Some(&token)).await.unwrap().ok().unwrap() })
}

pub type ChatSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens a chat's event WebSocket at `addr` the way the browser client does: the token offered
/// as the subprotocol `parley.token.<token>` beside `parley`. Answers the socket and the
/// subprotocol the server selected, or the refusal's status and body.
pub async fn chat_socket(addr: &str, chat_id: &str, after: u64, protocols: &str) -> Result<(ChatSocket, Option<String>), (u16, String)> {
    use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest};
    let mut request = format!("ws://{addr}/v1/chats/{chat_id}/ws?after={after}").into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", protocols.parse().unwrap());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, response)) => {
            let selected = response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_string());
            Ok((ws, selected))
        }
        Err(Error::Http(response)) => {
            let body = response.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("WebSocket to {addr}: {e}"),
    }
}

/// The subprotocols the browser client offers for `token`.
pub fn token_protocols(token: &str) -> String {
    format!("parley, parley.token.{token}")
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl command line");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir`: ca.pem, server.pem, server.key.
pub fn make_certificates(dir: &Path) {
    openssl(dir, &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Parley test CA"]);
    openssl(dir, &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(dir, &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext"]);
}

/// A deployment's [server] section for TLS with the certificates of `make_certificates`.
pub fn tls_deployment(dir: &Path) -> String {
    format!(
        "[server]\ntls_cert_file = \"{0}/server.pem\"\ntls_key_file = \"{0}/server.key\"\ntls_peer_ca_file = \"{0}/ca.pem\"\n",
        dir.display()
    )
}
