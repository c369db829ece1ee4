//! Criterion benches of the per-request authentication cost (SPEC §3): verifying an access token
//! (signature, expiry, type, binding, revocation) and the revocation check alone, with no
//! revocations and with 100,000 live ones.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use engine::{Authenticator, ClientInfo};
use server::config::TokenBinding;
use server::revocation::RevocationList;
use server::tokens::{JwtAuthenticator, TokenService, fingerprint};
use storage::{Revocation, RevocationKind};

fn revocations(n: usize) -> Arc<RevocationList> {
    let list = Arc::new(RevocationList::new());
    for i in 0..n {
        list.insert(Revocation {
            kind: RevocationKind::Session,
            subject: format!("revoked-session-{i}"),
            revoked_at_ms: 1,
            keep_until_ms: i64::MAX,
        });
    }
    list
}

fn bench(c: &mut Criterion) {
    let service = Arc::new(TokenService::hs256(
        b"bench-secret-bench-secret-bench-secret",
        &[],
    ));
    let client = ClientInfo {
        ip: "127.0.0.1".parse().unwrap(),
        user_agent: Some("Mozilla/5.0 (X11; Linux x86_64) bench"),
    };
    let fpt = fingerprint(TokenBinding::IpAndUserAgent, &client);
    let (token, _) = service
        .mint(
            "0b6f6a62-7c1b-4e51-9d7e-5f0e2f3c1a11",
            "alice",
            "session-1",
            900,
            fpt,
        )
        .unwrap();
    for n in [0usize, 100_000] {
        let list = revocations(n);
        let auth =
            JwtAuthenticator::new(service.clone(), TokenBinding::IpAndUserAgent, list.clone());
        c.bench_function(&format!("verify_access_hs256_bound/revoked={n}"), |b| {
            b.iter(|| {
                auth.verify_access(black_box(&token), black_box(&client))
                    .unwrap()
            });
        });
        c.bench_function(&format!("revocation_check_miss/revoked={n}"), |b| {
            b.iter(|| list.check(black_box("user-1"), black_box("session-1"), 5));
        });
        if n > 0 {
            c.bench_function(&format!("revocation_check_hit/revoked={n}"), |b| {
                b.iter(|| list.check(black_box("user-1"), black_box("revoked-session-77"), 5));
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
