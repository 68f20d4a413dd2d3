//! Rotated OAuth refresh tokens, kept in MongoDB (`oauth_tokens`, one document per
//! integration config) encrypted with XChaCha20-Poly1305 under a key derived from
//! `[security] token_key` (SHA-256 of it), the config name bound as associated data.
//!
//! Each document also holds a fingerprint (SHA-256) of the refresh token configured in
//! the integration file when the chain started: when an operator re-authorizes and puts a
//! new token in the environment, the saved chain no longer matches and is ignored, so the
//! new token is used. It also holds a fingerprint of where the token goes (`token_url`
//! and `client_id`): a config re-applied with another token URL (an ADMIN of the API
//! pointing it at a host of their own) does not send the saved token there; it starts
//! again from the configured one.

use bson::spec::BinarySubtype;
use bson::{doc, Binary, DateTime, Document};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use sluice_connectors::http::{BoxFuture, TokenVault};
use sluice_connectors::Store;
use sluice_core::model::{collections as c, common};

const NONCE: &str = "nonce";
const CIPHERTEXT: &str = "ciphertext";
const SEED: &str = "seed";
const ROTATED_AT: &str = "rotatedAt";
const BOUND_TO: &str = "boundTo";

/// The vault of one integration config.
pub struct MongoTokenVault {
    store: Store,
    config: String,
    key: [u8; 32],
    seed: String,
    /// Fingerprint of the token URL and client id the chain is used with.
    bound_to: String,
}

impl MongoTokenVault {
    /// `configured` is the refresh token of the integration file (resolved secret);
    /// `token_url` and `client_id` are where it is sent.
    pub fn new(
        store: Store,
        config: &str,
        token_key: &str,
        configured: &str,
        token_url: &str,
        client_id: &str,
    ) -> Self {
        let key: [u8; 32] = Sha256::digest(token_key.as_bytes()).into();
        // Not keyed: a changed `token_key` must read as "wrong key", not as a new token.
        // Refresh tokens are long random values, so their hash reveals nothing useful.
        Self {
            store,
            config: config.to_string(),
            key,
            seed: fingerprint(&[config, configured]),
            bound_to: fingerprint(&[token_url, client_id]),
        }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.key).into())
    }

    fn seal(&self, token: &str) -> Result<([u8; 24], Vec<u8>), String> {
        let nonce: [u8; 24] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: token.as_bytes(),
                    aad: self.config.as_bytes(),
                },
            )
            .map_err(|_| "encryption failed".to_string())?;
        Ok((nonce, sealed))
    }

    fn open(&self, d: &Document) -> Result<String, String> {
        let (Ok(nonce), Ok(sealed)) = (
            d.get_binary_generic(NONCE),
            d.get_binary_generic(CIPHERTEXT),
        ) else {
            return Err("the saved token is incomplete".into());
        };
        if nonce.len() != 24 {
            return Err("the saved token is incomplete".into());
        }
        let plain = self
            .cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: self.config.as_bytes(),
                },
            )
            .map_err(|_| {
                "the saved refresh token does not decrypt: was `security.token_key` changed?"
                    .to_string()
            })?;
        String::from_utf8(plain).map_err(|_| "the saved token is not text".into())
    }
}

/// SHA-256 (hex) of `parts` separated by NULs (so `("ab", "c")` and `("a", "bc")`
/// differ). The seeds of chains already saved were made this way: it must not change.
fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0]);
        }
        h.update(part.as_bytes());
    }
    format!("{:x}", h.finalize())
}

fn binary(bytes: Vec<u8>) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes,
    }
}

impl TokenVault for MongoTokenVault {
    fn load(&self) -> BoxFuture<'_, Result<Option<String>, String>> {
        Box::pin(async move {
            let found = self
                .store
                .collection(c::OAUTH_TOKENS)
                .find_one(doc! { common::ID: &self.config })
                .await
                .map_err(|e| e.to_string())?;
            match found {
                Some(d) if d.get_str(SEED).ok() == Some(self.seed.as_str()) => {
                    // A chain saved before the binding was kept has none: it is bound at
                    // its next rotation.
                    if d.get_str(BOUND_TO).is_ok_and(|b| b != self.bound_to) {
                        tracing::warn!(config = %self.config, "the saved refresh token was kept for another token URL or client id: not sent to this one; the configured refresh token is used (re-authorize if the provider spent it)");
                        return Ok(None);
                    }
                    self.open(&d).map(Some)
                }
                // None saved, or saved for a token the operator has since replaced.
                _ => Ok(None),
            }
        })
    }

    fn save<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let (nonce, sealed) = self.seal(token)?;
            self.store
                .collection(c::OAUTH_TOKENS)
                .update_one(
                    doc! { common::ID: &self.config },
                    doc! { "$set": {
                        NONCE: binary(nonce.to_vec()),
                        CIPHERTEXT: binary(sealed),
                        SEED: &self.seed,
                        BOUND_TO: &self.bound_to,
                        ROTATED_AT: DateTime::now(),
                    } },
                )
                .upsert(true)
                .write_concern(self.store.write_concern().clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed is what chains saved by earlier versions are found by: the config name,
    /// a NUL, the configured token.
    #[test]
    fn fingerprints_keep_the_saved_seeds_form() {
        let by_hand = format!("{:x}", Sha256::digest(b"crm\0rt-initial"));
        assert_eq!(fingerprint(&["crm", "rt-initial"]), by_hand);
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
    }
}
