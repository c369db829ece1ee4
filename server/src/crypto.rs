//! Secrets at rest and in tokens: AES-256-GCM sealing with a key id (current key to write, retired
//! keys still read), the HMAC blind index of e-mails, token hashing, random ids. Holds keys; never
//! logs or returns them.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Sealed blobs start with this version byte, then 4 bytes of key id, 12 of nonce, then the
/// ciphertext with its tag.
const SEALED_V1: u8 = 1;

/// AES-256-GCM with key rotation.
pub struct Sealer {
    current: (u32, Aes256Gcm),
    old: Vec<(u32, Aes256Gcm)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer { *** }")
    }
}

/// A short id naming a key without revealing it.
fn key_id(key: &[u8; 32]) -> u32 {
    let digest = Sha256::new()
        .chain_update(b"ringhub-aes-kid:")
        .chain_update(key)
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl Sealer {
    /// Seals with `current`; opens with it or any of `old`.
    pub fn new(current: &[u8; 32], old: &[[u8; 32]]) -> Self {
        let cipher = |k: &[u8; 32]| (key_id(k), Aes256Gcm::new(k.into()));
        Self {
            current: cipher(current),
            old: old.iter().map(cipher).collect(),
        }
    }

    /// Encrypts `plain`, binding it to `context` (associated data) so that a blob cannot be
    /// moved to another column or row purpose.
    pub fn seal(&self, plain: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        random_fill(&mut nonce);
        let (id, cipher) = &self.current;
        let payload = aes_gcm::aead::Payload {
            msg: plain,
            aad: context,
        };
        // Encryption with a valid key and a 12-byte nonce cannot fail for inputs below 64 GiB.
        let sealed = cipher
            .encrypt(&Nonce::from(nonce), payload)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(17 + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a blob made by [`Sealer::seal`] with the same `context`; `None` when it was
    /// tampered with, made for another context, or sealed with a key no longer configured.
    pub fn open(&self, blob: &[u8], context: &[u8]) -> Option<Vec<u8>> {
        if blob.len() < 17 + 16 || blob[0] != SEALED_V1 {
            return None;
        }
        let id = u32::from_be_bytes([blob[1], blob[2], blob[3], blob[4]]);
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&blob[5..17]);
        let nonce = Nonce::from(nonce);
        std::iter::once(&self.current)
            .chain(self.old.iter())
            .filter(|(kid, _)| *kid == id)
            .find_map(|(_, cipher)| {
                let payload = aes_gcm::aead::Payload {
                    msg: &blob[17..],
                    aad: context,
                };
                cipher.decrypt(&nonce, payload).ok()
            })
    }
}

/// The HMAC-SHA256 blind index of a normalized e-mail.
pub fn blind_index(key: &[u8], email: &str) -> Vec<u8> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return Sha256::digest(email.as_bytes()).to_vec();
    };
    mac.update(b"email:");
    mac.update(email.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// SHA-256 of a token or body.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// Fills `buf` from the OS generator. The OS generator failing is unrecoverable for a server
/// that mints secrets, so it aborts rather than hand out predictable values.
pub fn random_fill(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        tracing::error!(error = %e, "the OS random generator failed");
        std::process::abort();
    }
}

/// `n` random bytes as unpadded base64url.
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    random_fill(&mut bytes);
    data_encoding::BASE64URL_NOPAD.encode(&bytes)
}

/// A random (version 4) UUID string.
pub fn uuid_v4() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Compares two byte strings in time independent of where they differ (`subtle`, whose
/// comparison the optimizer is kept from turning into an early exit). Only the length may tell.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_rotation_and_context() {
        let old_key = [7u8; 32];
        let new_key = [9u8; 32];
        let before = Sealer::new(&old_key, &[]);
        let blob = before.seal(b"alice@example.com", b"email");
        let after = Sealer::new(&new_key, &[old_key]);
        assert_eq!(after.open(&blob, b"email").unwrap(), b"alice@example.com");
        assert!(after.open(&blob, b"other").is_none());
        let fresh = after.seal(b"x", b"email");
        assert!(before.open(&fresh, b"email").is_none());
        let mut tampered = blob;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(after.open(&tampered, b"email").is_none());
        assert!(after.open(b"short", b"email").is_none());
    }

    #[test]
    fn blind_index_is_keyed_and_stable() {
        assert_eq!(blind_index(b"k1", "a@b.c"), blind_index(b"k1", "a@b.c"));
        assert_ne!(blind_index(b"k1", "a@b.c"), blind_index(b"k2", "a@b.c"));
    }

    #[test]
    fn uuid_shape() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }
}
