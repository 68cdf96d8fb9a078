//! `parley serve` refuses a broken deployment before it serves anything, with one line that
//! names the slot, the file and the problem.

mod common;

use common::*;
use parley::plugins::builtin::PLUGIN_DIR;

fn refusal(name: &str, toml: &str, files: &[(&str, &[u8])]) -> String {
    let data = Scratch::new(name);
    for (file, bytes) in files {
        std::fs::write(data.path().join(file), bytes).unwrap();
    }
    let (code, stderr) = Server::refuse(&data.path().join("data"), &data.deployment(toml));
    assert_eq!(code, 2, "{name}: exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{name}: one line, got {lines:?}");
    lines[0].to_string()
}

fn assert_names(line: &str, parts: &[&str]) {
    for p in parts {
        assert!(line.contains(p), "{line:?} should mention {p:?}");
    }
}

#[test]
fn missing_file() {
    let line = refusal("missing", "[plugins.intermediate]\nfile = \"nowhere.wasm\"\n", &[]);
    assert_names(&line, &["slot intermediate", "nowhere.wasm", "cannot read the component"]);
}

#[test]
fn not_a_component() {
    let line = refusal("garbage", "[plugins.final]\nfile = \"notes.wasm\"\n", &[("notes.wasm", b"hello, not wasm")]);
    assert_names(&line, &["slot final", "notes.wasm", "not a WebAssembly component"]);
    let module = wat::parse_str("(module)").unwrap();
    let line = refusal("module", "[plugins.final]\nfile = \"core.wasm\"\n", &[("core.wasm", &module)]);
    assert_names(&line, &["slot final", "core.wasm", "core WebAssembly module, not a component"]);
}

#[test]
fn wrong_world() {
    let toml = format!("[plugins.intermediate]\nfile = \"{PLUGIN_DIR}/default_policy.wasm\"\n");
    let line = refusal("world", &toml, &[]);
    assert_names(&line, &["slot intermediate", "default_policy.wasm", "is a save-error-policy plugin", "needs a transcript-store plugin"]);
}

#[test]
fn wrong_version() {
    let component = wat::parse_str(
        r#"(component
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            (func $f (canon lift (core func $i "f")))
            (instance $store (export "purge" (func $f)))
            (export "parley:plugin/store@0.2.0" (instance $store)))"#,
    )
    .unwrap();
    let line = refusal("version", "[plugins.intermediate]\nfile = \"future.wasm\"\n", &[("future.wasm", &component)]);
    assert_names(&line, &["slot intermediate", "future.wasm", "speaks parley:plugin@0.2.0", "supports parley:plugin@0.1.0"]);
}

#[test]
fn import_the_host_does_not_provide() {
    let component = wat::parse_str(
        r#"(component
            (import "wasi:http/types@0.2.0" (instance (export "send" (func))))
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            (func $f (canon lift (core func $i "f")))
            (instance $policy (export "decide" (func $f)))
            (export "parley:plugin/policy@0.1.0" (instance $policy)))"#,
    )
    .unwrap();
    let line = refusal("http", "[plugins.save-error-policy]\nfile = \"http.wasm\"\n", &[("http.wasm", &component)]);
    assert_names(&line, &["slot save-error-policy", "http.wasm", "does not provide", "wasi:http/types@0.2.0"]);
}

#[test]
fn import_not_granted() {
    let toml = format!("[plugins.intermediate]\nfile = \"{PLUGIN_DIR}/sqlite_store.wasm\"\ngrants = [\"log\"]\n");
    let line = refusal("grant", &toml, &[]);
    assert_names(&line, &["slot intermediate", "sqlite_store.wasm", "imports parley:plugin/sql@0.1.0", "does not grant it", "\"sql\""]);
}

#[test]
fn settings_refused_by_the_plugin() {
    let toml = "[plugins.save-error-policy]\nfile = \"builtin:default-policy\"\nsettings = { on_error = \"explode\" }\n";
    let line = refusal("settings", toml, &[]);
    assert_names(&line, &["slot save-error-policy", "builtin:default-policy", "refused its settings", "on_error"]);
}

#[test]
fn unknown_builtin_and_unknown_setting() {
    let line = refusal("builtin", "[plugins.notice-handler]\nfile = \"builtin:nope\"\n", &[]);
    assert_names(&line, &["slot notice-handler", "builtin:nope", "no built-in plugin"]);
    let line = refusal("config", "[transcript]\nauto_save = 7\n", &[]);
    assert_names(&line, &["auto_save"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_deployment_starts_and_serves() {
    let data = Scratch::new("example");
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/single-instance.toml")).unwrap();
    let example = example.replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"");
    let server = Server::start(&data.path().join("data"), Some(&data.deployment(&example)));
    let (mut customer, _agent) = open_chat(&server, "Ann").await;
    assert_eq!(customer.send("hello", "c1").await.status, 200);
}

/// A rollback to a Parley whose store cannot read the database's layout is refused before the
/// store touches the file: started anyway, it would serve chats without the events it does not
/// know where to find. A newer layout that older stores can still read starts as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_in_a_layout_this_store_cannot_read_is_refused() {
    let data = Scratch::new("schema");
    let server = Server::start(data.path(), None);
    let (mut customer, _agent) = open_chat(&server, "Ann").await;
    assert_eq!(customer.send("before the upgrade", "c1").await.status, 200);
    server.kill9();
    assert_eq!(data.read_integer("SELECT version FROM store_schema", []), 3);
    let stored = || data.read_integer("SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM event_log)", []);
    let events = stored();
    assert!(events >= 2, "the chat's events are stored: {events}");
    let write = |version: i64, readable_from: i64| {
        let db = rusqlite::Connection::open(data.path().join("parley.db")).unwrap();
        db.execute("UPDATE store_schema SET version = ?1, readable_from = ?2", [version, readable_from]).unwrap();
    };

    write(4, 3);
    let server = Server::start(data.path(), None);
    let (mut customer, _agent) = open_chat(&server, "Bob").await;
    assert_eq!(customer.send("after a compatible upgrade", "c1").await.status, 200);
    server.kill9();
    assert_eq!(data.read_integer("SELECT version FROM store_schema", []), 4, "a store never lowers the recorded layout");

    write(5, 4);
    let events = stored();
    let (code, stderr) = Server::refuse(data.path(), &data.deployment(""));
    assert_eq!(code, 2, "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got {lines:?}");
    assert_names(lines[0], &["slot intermediate", "builtin:sqlite-store", "could not start", "store schema 5", "schema 4 or newer", "this store is schema 3"]);
    assert_eq!(data.read_integer("SELECT version * 10 + readable_from FROM store_schema", []), 54, "the refusal left the record alone");
    assert_eq!(stored(), events, "and every event");
}
