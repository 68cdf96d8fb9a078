//! `parley plugin inspect` reports what the loader will see in a component.

mod common;

use common::Scratch;
use parley::plugins::builtin::PLUGIN_DIR;
use std::process::Command;

fn inspect(file: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_parley")).args(["plugin", "inspect", file]).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn inspect_names_world_version_exports_and_grants() {
    let (code, out, _) = inspect(&format!("{PLUGIN_DIR}/sqlite_store.wasm"));
    assert_eq!(code, 0);
    assert!(out.contains("world:   transcript-store (parley:plugin@0.1.0)"), "{out}");
    assert!(out.contains("parley:plugin/store@0.1.0: init, save, renew-lease, release-lease, locate, claim, load, save-final, purge"), "{out}");
    assert!(out.contains("parley:plugin/sql@0.1.0  (needs grant \"sql\")"), "{out}");

    let (code, out, _) = inspect(&format!("{PLUGIN_DIR}/default_notices.wasm"));
    assert_eq!(code, 0);
    assert!(out.contains("world:   notice-handler (parley:plugin@0.1.0)"), "{out}");
    assert!(!out.contains("plugin/sql"), "the notice plugin asks for no SQL: {out}");
}

#[test]
fn inspect_refuses_what_is_not_a_component() {
    let dir = Scratch::new("inspect");
    let module = dir.path().join("core.wasm");
    std::fs::write(&module, wat::parse_str("(module)").unwrap()).unwrap();
    let (code, _, err) = inspect(module.to_str().unwrap());
    assert_eq!(code, 2);
    assert!(err.contains("core WebAssembly module, not a component"), "{err}");
    let (code, _, err) = inspect("/nonexistent/plugin.wasm");
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the component"), "{err}");
}

/// Every scenario shipped with the default plugins passes with `parley plugin test`.
#[test]
fn shipped_scenarios_pass() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (plugin, dir) in [("default_policy.wasm", "plugins/default-policy/scenarios"), ("default_notices.wasm", "plugins/default-notices/scenarios")] {
        let mut ran = 0;
        for entry in std::fs::read_dir(repo.join(dir)).unwrap() {
            let scenario = entry.unwrap().path();
            let out = Command::new(env!("CARGO_BIN_EXE_parley"))
                .args(["plugin", "test", &format!("{PLUGIN_DIR}/{plugin}"), "--scenario"])
                .arg(&scenario)
                .env("PARLEY_LOG", "error")
                .output()
                .unwrap();
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}:\n{report}", scenario.display());
            assert!(report.contains(" 0 failed") && !report.contains("FAIL"), "{report}");
            ran += 1;
        }
        assert!(ran >= 2, "scenarios ship in {dir}");
    }
}
