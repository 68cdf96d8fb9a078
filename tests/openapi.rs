//! The running server's routes match the OpenAPI document: every documented path and method
//! is served, every other method on those paths is refused with 405, and documented
//! responses' required fields are present.

mod common;

use common::*;
use serde_json::{Value, json};

const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_routes_match_the_openapi_document() {
    let doc: Value = serde_json::from_str(include_str!("../src/server/openapi.json")).unwrap();
    let data = Scratch::new("openapi");
    let server = Server::start(data.path(), None);
    let mut c = server.client();
    let served: Value = c.get("/openapi.json", None).await.unwrap().ok().unwrap();
    assert_eq!(served, doc, "the server serves the document in the repository");

    let (customer, agent) = open_chat(&server, "Ann").await;
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 18, "the document covers the API");
    for (path, item) in paths {
        let concrete = path.replace("{chat_id}", &customer.chat_id);
        for method in METHODS {
            let documented = item.get(method.to_lowercase()).is_some();
            // The most privileged credential this path accepts, so auth never hides the route.
            let token = if path.starts_with("/admin") || path.ends_with("/stop") || path == "/v1/cluster" {
                ADMIN
            } else if path.ends_with("/join") || path == "/v1/queue" {
                AGENT
            } else if path.ends_with("/close") {
                agent.token.as_str()
            } else {
                customer.token.as_str()
            };
            let probe = if path.ends_with("/leave") || path.ends_with("/close") || path.ends_with("/stop") { "" } else { path.as_str() };
            if probe.is_empty() && documented {
                continue; // checked below without ending the chat
            }
            let body = (method != "GET").then(|| json!({"nickname": "Zed", "text": "hi", "typing": true}));
            let r = c.call(method.parse().unwrap(), &concrete, Some(token), body).await.unwrap();
            if documented {
                assert!(
                    r.status != 405 && r.error_code() != Some("not_found"),
                    "{method} {path} is documented but not served: {} {:?}",
                    r.status,
                    r.body
                );
                let status = r.status.to_string();
                assert!(item[method.to_lowercase()]["responses"].get(&status).is_some(), "{method} {path} answered {status}, which is not documented");
                let schema = &item[method.to_lowercase()]["responses"][&status]["content"]["application/json"]["schema"];
                check_required(&doc, schema, &r.body, &format!("{method} {path}"));
            } else {
                assert_eq!(r.status, 405, "{method} {path} is not documented but answered {} {:?}", r.status, r.body);
                assert_eq!(r.error_code(), Some("method_not_allowed"));
            }
        }
    }
    // The chat-ending endpoints, last.
    for (path, token) in [("leave", customer.token.as_str()), ("close", agent.token.as_str()), ("stop", ADMIN)] {
        let r = c.post(&format!("/v1/chats/{}/{path}", customer.chat_id), Some(token), json!({})).await.unwrap();
        assert!([200, 409].contains(&r.status), "POST {path}: {} {:?}", r.status, r.body);
    }
    let r = c.get("/v1/not-in-the-document", None).await.unwrap();
    assert_eq!(r.status, 404);
}

/// Checks that `value` has the required properties its schema names (following `$ref`s).
fn check_required(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => &doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")],
        None => schema,
    };
    for field in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        let name = field.as_str().unwrap();
        assert!(value.get(name).is_some(), "{at}: response lacks required field {name:?}: {value}");
        check_required(doc, &schema["properties"][name], &value[name], &format!("{at}.{name}"));
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for v in array {
            check_required(doc, items, v, at);
        }
    }
}
