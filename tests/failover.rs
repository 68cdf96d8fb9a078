//! The failover client continues a chat on another instance after the one serving it is
//! killed with SIGKILL: requests made during the outage are retried (same client_msg_id)
//! until the other instance answers, and nothing acknowledged is lost or doubled.

mod common;

use common::*;
use parley::client::FailoverClient;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_continues_on_another_instance_after_kill_9() {
    let data = Scratch::new("failover");
    let first = Server::start(data.path(), None);
    let second_address = spare_address();
    let instances = vec![first.addr.clone(), second_address.clone()];
    let mut customer = FailoverClient::new(&instances);
    let mut agent = FailoverClient::new(&instances);

    let created = customer.post("/v1/chats", None, json!({"nickname": "Ann"})).await.unwrap().ok().unwrap();
    let chat_id = created["chat_id"].as_str().unwrap().to_string();
    let customer_token = created["token"].as_str().unwrap().to_string();
    let joined = agent.post(&format!("/v1/chats/{chat_id}/join"), Some(AGENT), json!({"nickname": "Bob"})).await.unwrap().ok().unwrap();
    let agent_token = joined["token"].as_str().unwrap().to_string();
    let messages_path = format!("/v1/chats/{chat_id}/messages");

    let mut acked = Vec::new();
    for i in 0..10 {
        let (client, token, who) = if i % 2 == 0 { (&mut customer, &customer_token, "c") } else { (&mut agent, &agent_token, "a") };
        let r = client.post(&messages_path, Some(token), json!({"text": format!("{who}{i}"), "client_msg_id": format!("{who}{i}")})).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert!(r.instance.is_some(), "every response names its instance");
        acked.push((r.body["seq"].as_u64().unwrap(), format!("{who}{i}")));
    }

    // kill -9; the other instance comes up on the same data a moment later.
    first.kill9();
    let data_dir = data.path().to_path_buf();
    let address = second_address.clone();
    let second = tokio::task::spawn_blocking(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        Server::start_at(&data_dir, None, &address)
    });

    // Sent during the outage: retried until the second instance takes it.
    let r = customer.post(&messages_path, Some(&customer_token), json!({"text": "during the outage", "client_msg_id": "c-outage"})).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(customer.failovers >= 1);
    assert_eq!(customer.instance(), second_address);
    acked.push((r.body["seq"].as_u64().unwrap(), "during the outage".to_string()));
    let _second = second.await.unwrap();

    // A resend of a message the first instance acknowledged gets its original seq.
    let r = agent.post(&messages_path, Some(&agent_token), json!({"text": "a1", "client_msg_id": "a1"})).await.unwrap();
    assert_eq!(r.body["seq"].as_u64(), Some(acked[1].0));
    let r = agent.post(&messages_path, Some(&agent_token), json!({"text": "after", "client_msg_id": "a-after"})).await.unwrap();
    acked.push((r.body["seq"].as_u64().unwrap(), "after".to_string()));

    // Both see every acknowledged message exactly once, in order, and both reconnected.
    for token in [&customer_token, &agent_token] {
        let t = agent.get(&format!("/v1/chats/{chat_id}/transcript"), Some(token)).await.unwrap().ok().unwrap();
        assert_eq!(messages(&t), acked);
        assert_eq!(kinds(&t).iter().filter(|k| *k == "reconnected").count(), 2, "{t}");
    }
}
