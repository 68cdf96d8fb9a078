//! Randomized properties of transcript ordering and idempotency, against a real server: many
//! chats at once, each with a customer in two tabs and an agent, sending new messages and
//! resending earlier ones (with other text) concurrently, in a random interleaving. Then, and
//! again after kill -9 and a restart on the same data:
//! - every client_msg_id has exactly one seq, whatever was resent, from whichever tab;
//! - the transcript is dense (1, 2, 3, ...) and holds each message once, with its first text and
//!   its sender;
//! - messages one tab sent one after another have increasing seqs;
//! - polling events after any seq returns exactly the transcript's later events.
//!
//! The seed is printed; PARLEY_PROPERTY_SEED=N replays a run.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const CHATS: usize = 24;

/// One acknowledged message: its id, seq, first text and sender.
#[derive(Clone, Debug)]
struct Acked {
    id: String,
    seq: u64,
    text: String,
    sender: String,
}

/// One tab: sends its script one request after another; returns what it saw acknowledged,
/// in order (new messages only) and every resend's answer.
async fn run_tab(mut tab: Participant, name: String, seed: u64, own: Arc<Mutex<Vec<Acked>>>) -> (Vec<Acked>, Vec<(String, u64)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent = Vec::new();
    let mut resends = Vec::new();
    for i in 0..rng.random_range(10..40) {
        let earlier = own.lock().unwrap().clone();
        if !earlier.is_empty() && rng.random_bool(0.3) {
            let again = &earlier[rng.random_range(0..earlier.len())];
            let r = tab.send(&format!("other text {i}"), &again.id).await;
            assert_eq!(r.status, 200, "{name}: resend of {} answered {:?}", again.id, r.body);
            resends.push((again.id.clone(), r.body["seq"].as_u64().unwrap()));
            continue;
        }
        let id = format!("{name}-{i}-{}", rng.random::<u32>());
        let text = format!("{name} {i} {}", ["hi", "ünï", "你好", "مرحبا", "🎉👩‍👩‍👧", "a\nb"][rng.random_range(0..6)]);
        let r = tab.send(&text, &id).await;
        assert_eq!(r.status, 200, "{name}: {:?}", r.body);
        let acked = Acked { id, seq: r.body["seq"].as_u64().unwrap(), text, sender: tab.id.clone() };
        own.lock().unwrap().push(acked.clone());
        sent.push(acked);
        if rng.random_bool(0.2) {
            tokio::task::yield_now().await;
        }
    }
    (sent, resends)
}

/// What one chat's transcript must be, given everything acknowledged in it.
async fn check_chat(p: &mut Participant, acked: &[Acked], context: &str) {
    let transcript = p.transcript().await;
    scenarios::assert_dense(&transcript);
    let mut expected: Vec<&Acked> = acked.iter().collect();
    expected.sort_by_key(|a| a.seq);
    let got: Vec<(u64, String, String)> = transcript["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "message")
        .map(|e| (e["seq"].as_u64().unwrap(), e["text"].as_str().unwrap().to_string(), e["participant_id"].as_str().unwrap().to_string()))
        .collect();
    let want: Vec<(u64, String, String)> = expected.iter().map(|a| (a.seq, a.text.clone(), a.sender.clone())).collect();
    assert_eq!(got, want, "{context}: each acknowledged message once, first text, sender");

    // Resuming after any seq gives exactly the rest of the transcript. Events may still be
    // appended meanwhile (a participant's `reconnected` after the restart), so the answer must
    // run from after+1 to somewhere between the transcript read before and the one read after,
    // and match the latter event for event.
    let before = transcript["events"].as_array().unwrap().len() as u64;
    for after in [0, before / 3, before / 2, before.saturating_sub(1), before] {
        let events = p.events(after, 0).await;
        let later = p.transcript().await;
        let got = events["events"].as_array().unwrap().iter().filter(|e| e.get("seq").is_some()).cloned().collect::<Vec<_>>();
        let last = after + got.len() as u64;
        let all = later["events"].as_array().unwrap();
        assert!(last >= before && last <= all.len() as u64, "{context}: events after {after} end at {last}, transcript had {before} then {}", all.len());
        assert_eq!(got.as_slice(), &all[after as usize..last as usize], "{context}: events after {after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_and_idempotency_hold_under_random_concurrent_sends_and_a_kill_9() {
    let seed: u64 = std::env::var("PARLEY_PROPERTY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("properties: seed {seed} (PARLEY_PROPERTY_SEED={seed} replays it)");
    let data = Scratch::new("properties");
    let server = Server::start(data.path(), None);

    let mut chats = Vec::new();
    let mut runs = Vec::new();
    for c in 0..CHATS {
        let (customer, agent) = open_chat(&server, "Ann").await;
        let second_tab = Participant { client: server.client(), chat_id: customer.chat_id.clone(), id: customer.id.clone(), token: customer.token.clone() };
        let customer_acked = Arc::new(Mutex::new(Vec::new()));
        let agent_acked = Arc::new(Mutex::new(Vec::new()));
        let base = seed.wrapping_add(c as u64 * 3);
        let tabs = vec![
            tokio::spawn(run_tab(second_tab, format!("c{c}-tab2"), base, customer_acked.clone())),
            tokio::spawn(run_tab(Participant { client: server.client(), ..clone_of(&agent) }, format!("c{c}-agent"), base + 1, agent_acked)),
            tokio::spawn(run_tab(Participant { client: server.client(), ..clone_of(&customer) }, format!("c{c}-tab1"), base + 2, customer_acked)),
        ];
        runs.push(tabs);
        chats.push((customer, agent));
    }

    let mut acked_by_chat: Vec<Vec<Acked>> = Vec::new();
    for (c, tabs) in runs.into_iter().enumerate() {
        let mut acked = Vec::new();
        let mut seq_of: HashMap<String, u64> = HashMap::new();
        let mut resends = Vec::new();
        for tab in tabs {
            let (sent, again) = tab.await.unwrap();
            // One tab's messages, sent one after another, are in that order.
            assert!(sent.windows(2).all(|w| w[0].seq < w[1].seq), "seed {seed} chat {c}: a tab's messages out of order: {sent:?}");
            for a in &sent {
                assert!(seq_of.insert(a.id.clone(), a.seq).is_none(), "seed {seed}: id {} acknowledged twice", a.id);
            }
            acked.extend(sent);
            resends.extend(again);
        }
        for (id, seq) in resends {
            assert_eq!(seq_of.get(&id), Some(&seq), "seed {seed} chat {c}: the resend of {id} got another seq");
        }
        let seqs: std::collections::HashSet<u64> = acked.iter().map(|a| a.seq).collect();
        assert_eq!(seqs.len(), acked.len(), "seed {seed} chat {c}: two messages share a seq");
        check_chat(&mut chats[c].0, &acked, &format!("seed {seed} chat {c}")).await;
        acked_by_chat.push(acked);
    }

    // kill -9 and a restart on the same data: the same seqs for every id, the same transcripts.
    server.kill9();
    let server = Server::start(data.path(), None);
    for (c, ((customer, agent), acked)) in chats.iter_mut().zip(&acked_by_chat).enumerate() {
        customer.moved_to(&server);
        agent.moved_to(&server);
        for a in acked {
            let p = if a.sender == customer.id { &mut *customer } else { &mut *agent };
            let r = p.send("resent after the restart", &a.id).await;
            assert_eq!((r.status, r.body["seq"].as_u64()), (200, Some(a.seq)), "seed {seed} chat {c}: {} after kill -9: {:?}", a.id, r.body);
        }
        check_chat(customer, acked, &format!("seed {seed} chat {c}, after kill -9")).await;
    }
}

fn clone_of(p: &Participant) -> Participant {
    Participant { client: parley::client::Client::new(p.client.authority()), chat_id: p.chat_id.clone(), id: p.id.clone(), token: p.token.clone() }
}
