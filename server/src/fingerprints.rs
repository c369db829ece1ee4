//! One set of keys per service (SPEC §10): the fingerprint of each key every node must share —
//! the JWT signing key (`jwt_secret`, or the EdDSA key), `encryption_key` and `blind_index_key` —
//! is kept in the database by the first node to start. A node whose key differs refuses to start
//! in production mode and warns in development mode, naming the key. A fingerprint is 16 hex
//! digits of SHA-256 over a label and the key: it names the key without revealing it. A rotated
//! key (the recorded one is among the node's retired keys) replaces the record.

use sha2::{Digest, Sha256};
use storage::{Store, StoreError};

use crate::config::secrets::Secrets;
use crate::tokens::TokenService;

/// The fingerprints of one shared key on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrint {
    /// The configuration key it stands for.
    pub name: &'static str,
    /// Of the key in use.
    pub current: String,
    /// Of the retired keys this node still accepts.
    pub retired: Vec<String>,
}

/// How the database's record compares with this node's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The same key.
    Same,
    /// The recorded key is one this node retired: this node rotated it.
    Rotated,
    /// Another key.
    Differs,
}

/// Compares the recorded fingerprint with this node's key.
pub fn judge(recorded: &str, key: &KeyPrint) -> Verdict {
    if recorded == key.current {
        Verdict::Same
    } else if key.retired.iter().any(|r| r == recorded) {
        Verdict::Rotated
    } else {
        Verdict::Differs
    }
}

/// The fingerprint of `key` under the name `name`.
pub fn fingerprint(name: &str, key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"ringhub-key-fingerprint:")
        .chain_update(name.as_bytes())
        .chain_update(b":")
        .chain_update(key)
        .finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// This node's shared keys.
pub fn of_this_node(tokens: &TokenService, secrets: &Secrets) -> Vec<KeyPrint> {
    let (kid, retired_kids) = tokens.key_ids();
    vec![
        KeyPrint {
            name: "jwt_secret",
            current: kid,
            retired: retired_kids,
        },
        KeyPrint {
            name: "encryption_key",
            current: fingerprint("encryption_key", &secrets.encryption_key),
            retired: secrets
                .encryption_keys_old
                .iter()
                .map(|k| fingerprint("encryption_key", k))
                .collect(),
        },
        KeyPrint {
            name: "blind_index_key",
            current: fingerprint("blind_index_key", &secrets.blind_index_key),
            retired: Vec::new(),
        },
    ]
}

/// Records or compares each key; the names of the keys that differ from the record.
pub fn check(
    store: &dyn Store,
    keys: &[KeyPrint],
    now_ms: i64,
) -> Result<Vec<&'static str>, StoreError> {
    let mut differ = Vec::new();
    for key in keys {
        let recorded = store.key_fingerprint(key.name, &key.current, now_ms)?;
        match judge(&recorded, key) {
            Verdict::Same => {}
            Verdict::Rotated => {
                store.replace_key_fingerprint(key.name, &key.current, now_ms)?;
                tracing::info!(key = key.name, "a rotated key is now the service's");
            }
            Verdict::Differs => differ.push(key.name),
        }
    }
    Ok(differ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_judged_against_the_current_and_retired_keys() {
        let key = KeyPrint {
            name: "encryption_key",
            current: fingerprint("encryption_key", b"new"),
            retired: vec![fingerprint("encryption_key", b"old")],
        };
        assert_eq!(judge(&key.current, &key), Verdict::Same);
        assert_eq!(
            judge(&fingerprint("encryption_key", b"old"), &key),
            Verdict::Rotated
        );
        assert_eq!(
            judge(&fingerprint("encryption_key", b"other"), &key),
            Verdict::Differs
        );
    }

    #[test]
    fn fingerprints_depend_on_name_and_key_and_hide_it() {
        let a = fingerprint("blind_index_key", b"k");
        assert_eq!(a.len(), 16);
        assert_ne!(a, fingerprint("encryption_key", b"k"));
        assert_ne!(a, fingerprint("blind_index_key", b"l"));
        assert_eq!(a, fingerprint("blind_index_key", b"k"));
    }
}
