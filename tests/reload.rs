//! Plugin reload without restart (POST /admin/reload and SIGHUP): a broken deployment is
//! refused and the running plugins stay; a good one takes effect for the next calls, and chats
//! opened before the reload keep working.

mod common;

use common::*;
use parley::plugins::builtin::PLUGIN_DIR;
use serde_json::json;

fn deployment(policy_file: &str, on_error: &str) -> String {
    format!(
        r#"
[plugins.intermediate]
file = "{PLUGIN_DIR}/faulty_store.wasm"

[plugins.save-error-policy]
file = "{policy_file}"
settings = {{ resend_attempts = 0, on_error = "{on_error}" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_a_broken_deployment_and_applies_a_good_one() {
    let data = Scratch::new("reload");
    let config = data.deployment(&deployment("builtin:default-policy", "close"));
    let server = Server::start(&data.path().join("data"), Some(&config));
    let (mut before, _) = open_chat(&server, "Ann").await;
    assert_eq!(before.send("hello", "b1").await.status, 200);
    let mut admin = server.client();

    // Only an admin may reload.
    assert_eq!(admin.post("/admin/reload", Some(&before.token), json!({})).await.unwrap().status, 403);

    // A broken deployment is refused with the loader's line; the old policy (close) stays.
    std::fs::write(&config, deployment("missing-policy.wasm", "continue")).unwrap();
    let r = admin.post("/admin/reload", Some(ADMIN), json!({})).await.unwrap();
    assert_eq!((r.status, r.error_code()), (422, Some("reload_refused")), "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("slot save-error-policy") && message.contains("missing-policy.wasm"), "{message}");
    let (mut closes, _) = open_chat(&server, "Bo").await;
    assert_eq!(closes.send("!fail", "c1").await.status, 503);
    assert_eq!(closes.send("next", "c2").await.status, 409, "the old policy closed the chat");

    // A good deployment takes effect for the next calls, also in a chat opened before it.
    std::fs::write(&config, deployment("builtin:default-policy", "continue")).unwrap();
    let r = admin.post("/admin/reload", Some(ADMIN), json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(before.send("!fail", "b2").await.status, 503);
    assert_eq!(before.send("still open", "b3").await.status, 200, "the new policy continues the chat");

    // SIGHUP does the same.
    std::fs::write(&config, deployment("builtin:default-policy", "close")).unwrap();
    let status = std::process::Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let (mut later, _) = open_chat(&server, "Cy").await;
    let mut closed = false;
    for attempt in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(later.send("!fail", &format!("l{attempt}")).await.status, 503);
        if later.send("probe", &format!("p{attempt}")).await.status == 409 {
            closed = true;
            break;
        }
    }
    assert!(closed, "after SIGHUP the reloaded policy closes the chat");
    let texts: Vec<String> = messages(&before.transcript().await).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, vec!["hello", "still open"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_deployment_file_says_so() {
    let data = Scratch::new("reload-defaults");
    let server = Server::start(data.path(), None);
    let r = server.client().post("/admin/reload", Some(ADMIN), json!({})).await.unwrap();
    assert_eq!((r.status, r.error_code()), (422, Some("reload_refused")));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("no deployment file"));
}
