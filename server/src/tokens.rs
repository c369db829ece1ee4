//! Access tokens (SPEC §3): HS256 JWTs with a `kid` header naming the key, verified with no clock
//! leeway against the current secret and the retired ones; binding fingerprints (`fpt`); and the
//! engine's [`JwtAuthenticator`], which adds the binding and revocation checks. Refresh tokens are
//! opaque random strings handled by `accounts`; they are never JWTs, so neither kind passes for
//! the other.

use std::collections::HashMap;
use std::sync::Arc;

use engine::{AuthFailure, Authenticator, ClientInfo, Identity, Revoked};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TokenBinding;
use crate::revocation::RevocationList;

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
    /// Issued at (milliseconds): account-wide revocations compare against it, so that a login
    /// in the same second as a logout-all is not caught by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat_ms: Option<u64>,
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
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    validation: Validation,
    /// The JWKS document (EdDSA only).
    jwks: Option<String>,
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = 0;
    validation.validate_exp = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation
}

/// The DER bytes of the first PEM block in `pem` labelled `label`.
fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    data_encoding::BASE64.decode(body.as_bytes()).ok()
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
        Self {
            kid: key_id(secret),
            algorithm: Algorithm::HS256,
            encoding: EncodingKey::from_secret(secret),
            decoding,
            validation: validation(Algorithm::HS256),
            jwks: None,
        }
    }

    /// EdDSA (Ed25519) with the PKCS#8 PEM private key `pem` (`openssl genpkey -algorithm
    /// ed25519`); the public key is served as a JWKS.
    pub fn eddsa(pem: &str) -> Result<Self, String> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let der = pem_block(pem, "PRIVATE KEY")
            .ok_or("jwt_private_key_file: no PKCS#8 `PRIVATE KEY` PEM block")?;
        let signing = ed25519_dalek::SigningKey::from_pkcs8_der(&der)
            .map_err(|e| format!("jwt_private_key_file: not an Ed25519 PKCS#8 key: {e}"))?;
        let public = signing.verifying_key().to_bytes();
        let x = data_encoding::BASE64URL_NOPAD.encode(&public);
        let kid = key_id(&public);
        let decoding = DecodingKey::from_ed_components(&x)
            .map_err(|e| format!("jwt_private_key_file: {e}"))?;
        let jwks = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"{kid}","alg":"EdDSA","use":"sig"}}]}}"#
        );
        let mut keys = HashMap::new();
        keys.insert(kid.clone(), decoding);
        Ok(Self {
            kid,
            algorithm: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(&der),
            decoding: keys,
            validation: validation(Algorithm::EdDSA),
            jwks: Some(jwks),
        })
    }

    /// The id of the signing key and those of the retired keys still accepted (HS256).
    pub fn key_ids(&self) -> (String, Vec<String>) {
        let retired = self
            .decoding
            .keys()
            .filter(|k| **k != self.kid)
            .cloned()
            .collect();
        (self.kid.clone(), retired)
    }

    /// The JWKS document of `/.well-known/jwks.json` (EdDSA only).
    pub fn jwks(&self) -> Option<&str> {
        self.jwks.as_deref()
    }

    /// Mints an access token for `user_id` valid for `ttl_secs`, of `session` (empty for
    /// operator tokens), bound to `fingerprint` when given.
    pub fn mint(
        &self,
        user_id: &str,
        username: &str,
        session: &str,
        ttl_secs: u64,
        fingerprint: Option<String>,
    ) -> Result<(String, AccessClaims), String> {
        let now_ms = u64::try_from(crate::clock::now_ms()).unwrap_or(0);
        let now = now_ms / 1000;
        let claims = AccessClaims {
            sub: user_id.to_owned(),
            name: username.to_owned(),
            sid: session.to_owned(),
            jti: crate::crypto::random_token(12),
            iat: now,
            iat_ms: Some(now_ms),
            exp: now + ttl_secs,
            typ: "access".to_owned(),
            fpt: fingerprint,
        };
        let mut header = Header::new(self.algorithm);
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

/// The binding fingerprint of a client (SPEC §3): SHA-256 over the parts `binding` names, as
/// unpadded base64url of the first 16 bytes. `None` when binding is off.
pub fn fingerprint(binding: TokenBinding, client: &ClientInfo<'_>) -> Option<String> {
    let mut digest = Sha256::new().chain_update(b"ringhub-fpt:");
    match binding {
        TokenBinding::None => return None,
        TokenBinding::IpAndUserAgent => {
            let ip = match client.ip {
                std::net::IpAddr::V6(v6) => {
                    v6.to_ipv4_mapped().map_or(client.ip, std::net::IpAddr::V4)
                }
                v4 => v4,
            };
            digest.update(ip.to_string().as_bytes());
            digest.update(b"\n");
        }
        TokenBinding::UserAgent => {}
    }
    digest.update(client.user_agent.unwrap_or("").as_bytes());
    Some(data_encoding::BASE64URL_NOPAD.encode(&digest.finalize()[..16]))
}

/// The engine's view of tokens: signature, expiry, type, binding and revocation.
#[derive(Debug)]
pub struct JwtAuthenticator {
    tokens: Arc<TokenService>,
    binding: TokenBinding,
    revocations: Arc<RevocationList>,
}

impl JwtAuthenticator {
    /// Verifies with `tokens`, binding per `binding`, revocation per `revocations`.
    pub fn new(
        tokens: Arc<TokenService>,
        binding: TokenBinding,
        revocations: Arc<RevocationList>,
    ) -> Self {
        Self {
            tokens,
            binding,
            revocations,
        }
    }

    /// The JWKS document (EdDSA only).
    pub fn jwks(&self) -> Option<&str> {
        self.tokens.jwks()
    }

    fn identity(claims: AccessClaims) -> Identity {
        Identity {
            user_id: Arc::from(claims.sub),
            username: Arc::from(claims.name),
            session_id: Arc::from(claims.sid),
            issued_at_ms: claims
                .iat_ms
                .unwrap_or_else(|| claims.iat.saturating_mul(1000)),
            expires_at_ms: claims.exp.saturating_mul(1000),
            binding: claims.fpt.map(Arc::from),
        }
    }

    fn not_revoked(&self, identity: Identity) -> Result<Identity, AuthFailure> {
        match self.revoked(&identity) {
            Some(_) => Err(AuthFailure::Revoked),
            None => Ok(identity),
        }
    }
}

impl Authenticator for JwtAuthenticator {
    fn verify_access(&self, token: &str, client: &ClientInfo<'_>) -> Result<Identity, AuthFailure> {
        let claims = self.tokens.verify(token)?;
        if let Some(fpt) = &claims.fpt
            && let Some(expected) = fingerprint(self.binding, client)
            && !crate::crypto::constant_time_eq(fpt.as_bytes(), expected.as_bytes())
        {
            return Err(AuthFailure::WrongFingerprint);
        }
        self.not_revoked(Self::identity(claims))
    }

    fn verify_refresh(&self, token: &str, current: &Identity) -> Result<Identity, AuthFailure> {
        let claims = self.tokens.verify(token)?;
        if let Some(fpt) = &claims.fpt
            && self.binding != TokenBinding::None
            && current.binding.as_deref() != Some(fpt.as_str())
        {
            return Err(AuthFailure::WrongFingerprint);
        }
        self.not_revoked(Self::identity(claims))
    }

    fn revoked(&self, identity: &Identity) -> Option<Revoked> {
        self.revocations.check(
            &identity.user_id,
            &identity.session_id,
            identity.issued_at_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_verify_and_rotation() {
        let old = TokenService::hs256(b"old-secret-old-secret-old-secret!!", &[]);
        let (old_token, _) = old.mint("u1", "alice", "", 60, None).unwrap();
        let current = TokenService::hs256(
            b"new-secret-new-secret-new-secret!!",
            &[b"old-secret-old-secret-old-secret!!".to_vec()],
        );
        let (token, claims) = current.mint("u1", "alice", "s1", 60, None).unwrap();
        assert_eq!(current.verify(&token).unwrap(), claims);
        assert_eq!(current.verify(&old_token).unwrap().sub, "u1");
        let stranger = TokenService::hs256(b"other-secret-other-secret-other!!", &[]);
        assert_eq!(stranger.verify(&token), Err(AuthFailure::Malformed));
        assert_eq!(current.verify("not.a.jwt"), Err(AuthFailure::Malformed));
    }

    #[test]
    fn eddsa_signs_verifies_and_publishes_its_key() {
        // RFC 8032 test 1's secret key, as PKCS#8.
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n";
        let svc = TokenService::eddsa(pem).unwrap();
        let (token, claims) = svc.mint("u1", "alice", "s1", 60, None).unwrap();
        assert_eq!(svc.verify(&token).unwrap(), claims);
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().alg,
            Algorithm::EdDSA
        );
        // RFC 8032's public key for that secret.
        assert!(
            svc.jwks()
                .unwrap()
                .contains("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
        );
        let hs = TokenService::hs256(b"secret-secret-secret-secret-secret", &[]);
        let (other, _) = hs.mint("u1", "alice", "", 60, None).unwrap();
        assert_eq!(svc.verify(&other), Err(AuthFailure::Malformed));
        assert!(TokenService::eddsa("not a key").is_err());
    }

    #[test]
    fn expired_tokens_fail_without_leeway() {
        let svc = TokenService::hs256(b"secret-secret-secret-secret-secret", &[]);
        let (token, _) = svc.mint("u1", "alice", "", 0, None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(svc.verify(&token), Err(AuthFailure::Expired));
    }
}
