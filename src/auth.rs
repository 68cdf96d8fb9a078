//! Tokens: random 128-bit secrets handed out once, kept only as SHA-256 digests, compared in
//! constant time.

use rand::RngCore;
use sha2::{Digest, Sha256};

pub type TokenHash = [u8; 32];

/// A new random token (128 bits, hex) and the digest to keep.
pub fn new_token() -> (String, TokenHash) {
    let mut secret = [0u8; 16];
    rand::rng().fill_bytes(&mut secret);
    let token = hex::encode(secret);
    let hash = hash(&token);
    (token, hash)
}

pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

pub fn same(a: &TokenHash, b: &TokenHash) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A random identifier for chats and participants (128 bits, hex).
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// HMAC-SHA256 of `parts` (separated by NUL) under `key`, its first 128 bits as hex: ids and
/// tokens that every instance of a cluster derives alike, so a retried create or join gets
/// the answer the lost one carried, from whichever instance it reaches.
pub fn derive(key: &[u8], parts: &[&str]) -> String {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            inner.update([0]);
        }
        inner.update(part.as_bytes());
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    hex::encode(&outer.finalize()[..16])
}

/// The agent and admin tokens a deployment accepts, as digests.
#[derive(Default, Clone)]
pub struct StaffTokens {
    pub agents: Vec<TokenHash>,
    pub admins: Vec<TokenHash>,
}

impl StaffTokens {
    pub fn is_agent(&self, token: &str) -> bool {
        let h = hash(token);
        self.agents.iter().any(|a| same(a, &h))
    }
    pub fn is_admin(&self, token: &str) -> bool {
        let h = hash(token);
        self.admins.iter().any(|a| same(a, &h))
    }
}
