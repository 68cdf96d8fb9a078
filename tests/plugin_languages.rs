//! The default save-error policy written in Python (componentize-py) and in JavaScript
//! (componentize-js), both under examples/, built here from source: each makes exactly the
//! decisions the Rust policy makes on the shipped scenarios, and the host serves chats with
//! it. The build tools are installed under target/plugin-tools (PyPI) and
//! examples/js-policy/node_modules (npm) on first use, so `cargo test` needs no setup step.

mod common;

use common::*;
use parley::plugins::builtin::PLUGIN_DIR;
use std::path::{Path, PathBuf};
use std::process::Command;

const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tools() -> PathBuf {
    let dir = repo().join("target/plugin-tools");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn python_policy() -> PathBuf {
    let site = tools().join("python");
    if !site.join("componentize_py").exists() {
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--target"]).arg(&site).arg(COMPONENTIZE_PY), "pip install componentize-py");
    }
    let out = tools().join("policy-py.wasm");
    run(
        Command::new("python3")
            .args(["-c", "import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; sys.exit(script())"])
            .args(["-d", "../../wit", "-w", "save-error-policy", "componentize", "app", "-o"])
            .arg(&out)
            .env("PYTHONPATH", &site)
            .current_dir(repo().join("examples/python-policy")),
        "componentize-py",
    );
    out
}

fn js_policy() -> PathBuf {
    let dir = repo().join("examples/js-policy");
    if !dir.join("node_modules/@bytecodealliance/componentize-js").exists() {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir), "npm ci");
    }
    let out = tools().join("policy-js.wasm");
    run(Command::new("node").arg("build.mjs").arg(&out).current_dir(&dir), "componentize-js");
    out
}

/// `parley plugin test` on a scenario: (exit code, the report without its first line, which names the file).
fn plugin_test(plugin: &Path, scenario: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["plugin", "test"])
        .arg(plugin)
        .arg("--scenario")
        .arg(repo().join(scenario))
        .env("PARLEY_LOG", "error")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).lines().skip(1).collect::<Vec<_>>().join("\n");
    (out.status.code().unwrap_or(-1), report)
}

const SCENARIOS: [&str; 2] = ["plugins/default-policy/scenarios/close.toml", "plugins/default-policy/scenarios/continue.toml"];

fn same_decisions_as_rust(plugin: &Path) {
    let rust = Path::new(PLUGIN_DIR).join("default_policy.wasm");
    for scenario in SCENARIOS {
        let (code, expected) = plugin_test(&rust, scenario);
        assert_eq!(code, 0, "the Rust policy passes {scenario}:\n{expected}");
        let (code, got) = plugin_test(plugin, scenario);
        assert_eq!(code, 0, "{} passes {scenario}:\n{got}", plugin.display());
        assert_eq!(got, expected, "{} decides exactly as the Rust policy on {scenario}", plugin.display());
    }
}

/// The host serves chats with the plugin in the save-error-policy slot: a save the store
/// refuses is not retried (`resend_attempts = 0`) and `continue` keeps the chat open.
async fn serves_chats_with(plugin: &Path) {
    let data = Scratch::new("language-policy");
    let deployment = data.deployment(&format!(
        r#"
[plugins.intermediate]
file = "{PLUGIN_DIR}/faulty_store.wasm"

[plugins.save-error-policy]
file = "{}"
settings = {{ resend_attempts = 0, on_error = "continue" }}
"#,
        plugin.display()
    ));
    let server = Server::start(data.path(), Some(&deployment));
    let (mut customer, mut agent) = open_chat(&server, "Ann").await;
    assert_eq!(customer.send("one", "c1").await.status, 200);
    let r = customer.send("!fail", "c2").await;
    assert_eq!((r.status, r.error_code()), (503, Some("not_saved")), "{:?}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("please resend"), "{:?}", r.body);
    assert_eq!(customer.send("two", "c3").await.status, 200, "the chat goes on");
    let texts: Vec<String> = messages(&agent.transcript().await).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["one", "two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_policy_decides_like_the_rust_one() {
    let plugin = python_policy();
    same_decisions_as_rust(&plugin);
    serves_chats_with(&plugin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_policy_decides_like_the_rust_one() {
    let plugin = js_policy();
    same_decisions_as_rust(&plugin);
    serves_chats_with(&plugin).await;
}

#[test]
fn plugin_test_fails_a_plugin_that_decides_otherwise() {
    // The default notice handler is not a policy; the Rust policy with a scenario that
    // expects something else fails, names the step, and exits 1.
    let dir = Scratch::new("scenario");
    let scenario = dir.path().join("wrong.toml");
    std::fs::write(
        &scenario,
        "settings = { resend_attempts = 1 }\n[[step]]\nname = \"expects a close too early\"\nfailures = [{ chat = \"c\", attempt = 1, error = \"unavailable\" }]\nexpect = [\"close\"]\n",
    )
    .unwrap();
    let (code, report) = plugin_test(&Path::new(PLUGIN_DIR).join("default_policy.wasm"), scenario.to_str().unwrap());
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("FAIL  1. expects a close too early: expected \"close\", got \"retry 500\""), "{report}");
    assert!(report.contains("0 passed, 1 failed"), "{report}");
}
