//! Access tokens (SPEC §3): HS256 JWTs with a `kid` header naming the key, verified with no clock
//! leeway against the current secret and the retired ones. Minting here serves `ringhub token`;
//! the accounts issue adds login, refresh, binding fingerprints and revocation.

use std::collections::HashMap;
use std::sync::Arc;

use engine::{AuthFailure, Authenticator, ClientInfo, Identity};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// User id.
    pub sub: String,
    /// Username.
    pub name: String,
    /// Session id (empty for operator-minted tokens).
    #[serde(default)]
    pub sid: String,
    /// Token id.
    pub jti: String,
    /// Issued at (seconds).
    pub iat: u64,
    /// Expiry (seconds).
    pub exp: u64,
    /// Always `access`.
    pub typ: String,
    /// Binding fingerprint, when bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fpt: Option<String>,
}

/// The key id of a secret: the first 16 hex digits of SHA-256 over a label and the secret, so
/// that it names the key without revealing it.
pub fn key_id(secret: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"ringhub-kid:")
        .chain_update(secret)
        .finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Signs and verifies access tokens.
pub struct TokenService {
    kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    /// HS256 with `secret`, also accepting tokens signed with `old` secrets.
    pub fn hs256(secret: &[u8], old: &[Vec<u8>]) -> Self {
        let mut decoding = HashMap::new();
        decoding.insert(key_id(secret), DecodingKey::from_secret(secret));
        for s in old {
            decoding.insert(key_id(s), DecodingKey::from_secret(s));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            kid: key_id(secret),
            encoding: EncodingKey::from_secret(secret),
            decoding,
            validation,
        }
    }

    /// Mints an access token for `user_id` valid for `ttl_secs` (not bound, no session).
    pub fn mint(
        &self,
        user_id: &str,
        username: &str,
        session: &str,
        ttl_secs: u64,
    ) -> Result<(String, AccessClaims), String> {
        let now = now_secs();
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(|e| e.to_string())?;
        let claims = AccessClaims {
            sub: user_id.to_owned(),
            name: username.to_owned(),
            sid: session.to_owned(),
            jti: data_encoding::HEXLOWER.encode(&jti),
            iat: now,
            exp: now + ttl_secs,
            typ: "access".to_owned(),
            fpt: None,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| e.to_string())?;
        Ok((token, claims))
    }

    /// Verifies signature, key, expiry and type.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, AuthFailure> {
        if token.len() > 8192 {
            return Err(AuthFailure::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Malformed)?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.decoding.get(kid))
            .ok_or(AuthFailure::Malformed)?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthFailure::Expired,
                _ => AuthFailure::Malformed,
            },
        )?;
        if data.claims.typ != "access" {
            return Err(AuthFailure::WrongType);
        }
        Ok(data.claims)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The engine's view: verification without revocation (revocation arrives with accounts).
#[derive(Debug)]
pub struct JwtAuthenticator {
    tokens: Arc<TokenService>,
}

impl JwtAuthenticator {
    /// Wraps a token service.
    pub fn new(tokens: Arc<TokenService>) -> Self {
        Self { tokens }
    }
}

impl Authenticator for JwtAuthenticator {
    fn verify_access(
        &self,
        token: &str,
        _client: &ClientInfo<'_>,
    ) -> Result<Identity, AuthFailure> {
        let claims = self.tokens.verify(token)?;
        // Bound tokens need the fingerprint check of the accounts issue; until then none are minted.
        if claims.fpt.is_some() {
            return Err(AuthFailure::WrongFingerprint);
        }
        Ok(Identity {
            user_id: Arc::from(claims.sub),
            username: Arc::from(claims.name),
            session_id: Arc::from(claims.sid),
            expires_at_ms: claims.exp.saturating_mul(1000),
        })
    }

    fn is_revoked(&self, _identity: &Identity) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_verify_and_rotation() {
        let old = TokenService::hs256(b"old-secret-old-secret-old-secret!!", &[]);
        let (old_token, _) = old.mint("u1", "alice", "", 60).unwrap();
        let current = TokenService::hs256(
            b"new-secret-new-secret-new-secret!!",
            &[b"old-secret-old-secret-old-secret!!".to_vec()],
        );
        let (token, claims) = current.mint("u1", "alice", "s1", 60).unwrap();
        assert_eq!(current.verify(&token).unwrap(), claims);
        assert_eq!(current.verify(&old_token).unwrap().sub, "u1");
        let stranger = TokenService::hs256(b"other-secret-other-secret-other!!", &[]);
        assert_eq!(stranger.verify(&token), Err(AuthFailure::Malformed));
        assert_eq!(current.verify("not.a.jwt"), Err(AuthFailure::Malformed));
    }

    #[test]
    fn expired_tokens_fail_without_leeway() {
        let svc = TokenService::hs256(b"secret-secret-secret-secret-secret", &[]);
        let (token, _) = svc.mint("u1", "alice", "", 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(svc.verify(&token), Err(AuthFailure::Expired));
    }
}
