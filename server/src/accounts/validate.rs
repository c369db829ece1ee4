//! Input rules of SPEC §2 for accounts: usernames, e-mails, passwords. Pure functions; each
//! failure names the field and says why, for `400 invalid_input`.

/// A rejected field and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field's name in the request body.
    pub field: &'static str,
    /// Why, for the client.
    pub message: &'static str,
}

fn invalid(field: &'static str, message: &'static str) -> Invalid {
    Invalid { field, message }
}

/// 3–32 of `[A-Za-z0-9_.-]`.
pub fn username(name: &str) -> Result<&str, Invalid> {
    if !(3..=32).contains(&name.len()) {
        return Err(invalid("username", "must be 3 to 32 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(invalid("username", "may contain only A-Z, a-z, 0-9, _ . -"));
    }
    Ok(name)
}

/// Trimmed, lower-cased, at most 254 bytes, one `@` with a non-empty local part and a domain
/// with a dot, no spaces or control characters.
pub fn email(raw: &str) -> Result<String, Invalid> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() || email.len() > 254 {
        return Err(invalid("email", "must be 1 to 254 bytes"));
    }
    let bad = || invalid("email", "is not a valid e-mail address");
    let (local, domain) = email.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.len() > 64
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    Ok(email)
}

/// 8–72 bytes (bcrypt's limit; longer is refused, never truncated).
pub fn password(field: &'static str, password: &str) -> Result<(), Invalid> {
    if password.len() < 8 {
        return Err(invalid(field, "must be at least 8 bytes"));
    }
    if password.len() > 72 {
        return Err(invalid(field, "must be at most 72 bytes"));
    }
    if password.contains('\0') {
        return Err(invalid(field, "must not contain NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(username("al").is_err());
        assert!(username("alice").is_ok());
        assert!(username("a.l-i_ce9").is_ok());
        assert!(username("al ice").is_err());
        assert!(username("ålice").is_err());
        assert!(username(&"a".repeat(33)).is_err());
    }

    #[test]
    fn emails() {
        assert_eq!(email("  Alice@Example.COM ").unwrap(), "alice@example.com");
        assert!(email("alice").is_err());
        assert!(email("a@b").is_err());
        assert!(email("a@@b.c").is_err());
        assert!(email("a b@c.d").is_err());
        assert!(email(&format!("{}@b.c", "a".repeat(300))).is_err());
    }

    #[test]
    fn passwords() {
        assert!(password("password", "short").is_err());
        assert!(password("password", &"x".repeat(72)).is_ok());
        assert_eq!(
            password("password", &"x".repeat(73)).unwrap_err().message,
            "must be at most 72 bytes"
        );
    }
}
