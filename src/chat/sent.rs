//! Which seq each participant's `client_msg_id` got (saved or pending), so a resend is
//! answered with the original seq and stores nothing new.
//!
//! A chat's index grows by one entry per message, and chats that started together grow
//! together: with a plain map of the strings, the indexes of 1,000 chats doubled within the
//! same few milliseconds (at 448 and 896 messages), each copying and rehashing its strings
//! into fresh memory, and ack latencies jumped by 200-300 ms for half a second. So:
//! - an entry is a 64-bit keyed hash of the pair, its seq, and a second, independent keyed hash
//!   of the pair: 24 bytes, no string copied per message, and a resize moves integers. A hit
//!   needs both hashes to match (about 2^-128 per pair of messages for another pair to pass),
//!   and is confirmed against the event itself while the event is in memory. Pairs whose key
//!   another pair of the chat took first (about 2^-64 per pair) wait in a list of their own;
//! - each chat's index doubles at a load of its own, between 1/2 and 1, so chats of the same
//!   age resize over the time it takes them to double, not all at once.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

pub(super) struct SentIds {
    /// Random per chat task: nobody can choose ids that collide.
    keys: RandomState,
    checks: RandomState,
    /// key -> (seq, check).
    seqs: HashMap<u64, (u64, u64), BuildHasherDefault<Prehashed>>,
    /// (key, check, seq) of the pairs whose key was taken.
    collided: Vec<(u64, u64, u64)>,
    /// This chat's load at which `seqs` doubles, as a share of its capacity, and the length
    /// that is for the present capacity.
    grow_share: f64,
    grow_at: usize,
    /// All ones; fewer in tests, to make keys collide.
    key_mask: u64,
}

impl Default for SentIds {
    fn default() -> Self {
        let keys = RandomState::new();
        let grow_share = 0.5 + (keys.hash_one(0u8) >> 11) as f64 / (1u64 << 54) as f64;
        Self { keys, checks: RandomState::new(), seqs: HashMap::default(), collided: Vec::new(), grow_share, grow_at: 0, key_mask: u64::MAX }
    }
}

impl SentIds {
    /// The seq `member` got for `id`, if it was sent. `is_pair(seq)`: whether the event with
    /// that seq is this pair's, None when it is no longer in memory; `find()`: the pair's seq,
    /// looked up in the events in memory.
    pub fn seq(&self, member: &str, id: &str, is_pair: impl Fn(u64) -> Option<bool>, find: impl FnOnce() -> Option<u64>) -> Option<u64> {
        let (key, check) = self.hashes(member, id);
        let hit = match self.seqs.get(&key) {
            Some(&(seq, c)) if c == check => Some(seq),
            _ => self.collided.iter().find(|&&(k, c, _)| k == key && c == check).map(|&(_, _, seq)| seq),
        }?;
        match is_pair(hit) {
            Some(true) | None => Some(hit),
            // Another pair with both hashes of this one.
            Some(false) => find(),
        }
    }

    /// A new pair (its lookup said so) got `seq`.
    pub fn insert(&mut self, member: &str, id: &str, seq: u64) {
        if self.seqs.len() >= self.grow_at {
            // At least one more than it holds: the next power of two of buckets, double.
            self.seqs.reserve(self.seqs.capacity() + 1 - self.seqs.len());
            self.grow_at = (self.seqs.capacity() as f64 * self.grow_share) as usize;
        }
        let (key, check) = self.hashes(member, id);
        match self.seqs.entry(key) {
            Entry::Vacant(v) => drop(v.insert((seq, check))),
            Entry::Occupied(_) => self.collided.push((key, check, seq)),
        }
    }

    /// `seq` was never saved: its number will be reused.
    pub fn remove(&mut self, member: &str, id: &str, seq: u64) {
        let (key, check) = self.hashes(member, id);
        if self.seqs.get(&key) == Some(&(seq, check)) {
            self.seqs.remove(&key);
        }
        self.collided.retain(|&entry| entry != (key, check, seq));
    }

    fn hashes(&self, member: &str, id: &str) -> (u64, u64) {
        (self.keys.hash_one((member, id)) & self.key_mask, self.checks.hash_one((member, id)))
    }
}

/// The keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("the keys are u64 hashes")
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::SentIds;

    /// Sends `n` messages from two members (ids reused across members), with `key_bits`-bit
    /// keys; the events are (member, id) by seq - 1.
    fn chat(n: u64, key_bits: u32) -> (SentIds, Vec<(String, String)>) {
        let mut sent = SentIds { key_mask: (1u64 << key_bits) - 1, ..SentIds::default() };
        let mut events = Vec::new();
        for i in 0..n {
            let (member, id) = (format!("p{}", i % 2), format!("m{}", i / 2));
            assert_eq!(lookup(&sent, &events, &member, &id), None, "{member} {id} is new");
            sent.insert(&member, &id, events.len() as u64 + 1);
            events.push((member, id));
        }
        (sent, events)
    }

    fn lookup(sent: &SentIds, events: &[(String, String)], member: &str, id: &str) -> Option<u64> {
        let is = |seq: u64| Some(events.get(seq as usize - 1).is_some_and(|(m, i)| m == member && i == id));
        let find = || events.iter().position(|(m, i)| m == member && i == id).map(|i| i as u64 + 1);
        sent.seq(member, id, is, find)
    }

    /// As a chat sees it once the events have left memory: nothing to confirm a hit against.
    fn lookup_forgotten(sent: &SentIds, member: &str, id: &str) -> Option<u64> {
        sent.seq(member, id, |_| None, || None)
    }

    #[test]
    fn every_sent_pair_finds_its_own_seq_and_no_other() {
        for key_bits in [64, 3] {
            let (sent, events) = chat(5_000, key_bits.min(63));
            assert_eq!(!sent.collided.is_empty(), key_bits == 3);
            for (i, (member, id)) in events.iter().enumerate() {
                assert_eq!(lookup(&sent, &events, member, id), Some(i as u64 + 1), "{member} {id}, {key_bits}-bit keys");
                assert_eq!(lookup_forgotten(&sent, member, id), Some(i as u64 + 1), "{member} {id}, {key_bits}-bit keys, not in memory");
            }
            for (member, id) in [("p0", "m5000"), ("p2", "m0"), ("p1", "m2500")] {
                assert_eq!(lookup(&sent, &events, member, id), None);
                assert_eq!(lookup_forgotten(&sent, member, id), None);
            }
        }
    }

    #[test]
    fn a_removed_pair_is_new_again_and_its_key_mates_stay() {
        for key_bits in [63, 1] {
            for removed in [10, 1] {
                let (mut sent, mut events) = chat(10, key_bits);
                let (member, id) = std::mem::take(&mut events[removed - 1]);
                sent.remove(&member, &id, removed as u64);
                assert_eq!(lookup(&sent, &events, &member, &id), None, "{key_bits}-bit keys");
                for (i, (member, id)) in events.iter().enumerate().filter(|(i, _)| i + 1 != removed) {
                    assert_eq!(lookup(&sent, &events, member, id), Some(i as u64 + 1), "{member} {id}, {key_bits}-bit keys, seq {removed} removed");
                }
            }
        }
    }

    #[test]
    fn chats_double_their_index_at_different_sizes() {
        let grown_at: std::collections::BTreeSet<usize> = (0..20)
            .map(|_| {
                let mut sent = SentIds::default();
                let mut capacity = 0;
                for i in 0..2_000 {
                    sent.insert("p", &i.to_string(), i as u64 + 1);
                    if sent.seqs.capacity() > 1_000 && capacity <= 1_000 {
                        return i;
                    }
                    capacity = sent.seqs.capacity();
                }
                unreachable!("the index holds 2,000 entries")
            })
            .collect();
        assert!(grown_at.len() > 10, "20 chats grew past 1,000 entries at only {grown_at:?}");
    }
}
