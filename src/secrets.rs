//! Secrets: random tokens, invite codes people can read aloud, API keys, SHA-256 for storing them,
//! and argon2id password hashes. Every secret comes from the OS CSPRNG and is stored only hashed.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::Rng;
use sha2::{Digest, Sha256};

/// Letters and digits that cannot be mistaken for one another (no 0/O, 1/I/l).
const CODE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
/// 20 symbols of 31 = 99 bits, written as four groups of five.
const CODE_LEN: usize = 20;

fn rng() -> rand::rngs::ThreadRng {
    // ThreadRng is a CSPRNG (ChaCha) seeded from the OS and reseeded periodically.
    rand::rng()
}

/// A random token for links and cookies: 256 bits, hex.
pub fn token() -> String {
    let bytes: [u8; 32] = rng().random();
    hex::encode(bytes)
}

/// A new invite code, e.g. `K7QMZ-P3XRT-9HWNE-4JCAB`.
pub fn invite_code() -> String {
    let mut r = rng();
    let symbols: Vec<char> = (0..CODE_LEN)
        .map(|_| CODE_ALPHABET[r.random_range(0..CODE_ALPHABET.len())] as char)
        .collect();
    symbols
        .chunks(5)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// Canonical form of a typed code: upper case, no spaces or dashes. `None` if it cannot be a code.
pub fn normalize_code(input: &str) -> Option<String> {
    let s: String = input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect::<String>()
        .to_uppercase();
    (s.len() == CODE_LEN && s.bytes().all(|b| CODE_ALPHABET.contains(&b))).then_some(s)
}

/// A new API key: `moss_` + 192 random bits.
pub fn api_key() -> String {
    let bytes: [u8; 24] = rng().random();
    format!("moss_{}", hex::encode(bytes))
}

/// SHA-256 hex digest: how codes, keys and tokens are stored (they are high-entropy, so a fast
/// hash is enough; a leaked table hands out nothing that works).
pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn argon2() -> Argon2<'static> {
    // OWASP's argon2id minimum: m = 19 MiB, t = 2, p = 1.
    let params = Params::new(19_456, 2, 1, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password (slow on purpose: call it off the async runtime).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::encode_b64(&rng().random::<[u8; 16]>())
        .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(argon2()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
        .to_string())
}

/// Checks a password against a stored hash (slow on purpose: call it off the async runtime).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// A valid hash of a random password: unknown accounts are checked against it so that a login
/// for an address that has no account takes as long as one for an address that has.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&token()).expect("argon2 works"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invite_codes_are_long_unambiguous_and_round_trip() {
        let code = invite_code();
        assert_eq!(code.len(), 23);
        assert!(!code.contains(['0', 'O', '1', 'I', 'L']), "{code}");
        let typed = code.to_lowercase().replace('-', " ");
        assert_eq!(normalize_code(&typed).unwrap(), code.replace('-', ""));
        assert_ne!(invite_code(), invite_code());
        assert!(normalize_code("too-short").is_none());
        assert!(normalize_code(&"0".repeat(20)).is_none());
    }

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn keys_and_tokens_are_random_and_hash_stably() {
        let k = api_key();
        assert!(k.starts_with("moss_") && k.len() == 53);
        assert_ne!(token(), token());
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
