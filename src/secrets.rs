//! Secrets: random tokens, invite codes people can read aloud, API keys, SHA-256 for storing them,
//! and argon2id password hashes. Every secret comes from the OS CSPRNG and is stored only hashed.

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
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

/// OWASP's argon2id minimum: m = 19 MiB, t = 2, p = 1.
fn params() -> Params {
    Params::new(19_456, 2, 1, Some(32)).expect("valid argon2 parameters")
}

/// Memory for argon2id (19 MiB), reused from one hash to the next: a hashing thread keeps one,
/// so hashing allocates nothing. (Allocating it per hash, on many threads, left each allocator
/// arena holding tens of MiB after a sign-in flood.)
pub struct Scratch(Vec<argon2::Block>);

impl Default for Scratch {
    fn default() -> Self {
        Self(vec![argon2::Block::default(); params().block_count()])
    }
}

impl Scratch {
    /// The first `n` blocks (grown for a stored hash made with more memory than ours).
    fn blocks(&mut self, n: usize) -> &mut [argon2::Block] {
        if self.0.len() < n {
            self.0.resize(n, argon2::Block::default());
        }
        &mut self.0[..n]
    }
}

/// Hashes a password into a PHC string (slow on purpose: call it off the async runtime).
pub fn hash_password_in(scratch: &mut Scratch, password: &str) -> anyhow::Result<String> {
    let salt_bytes: [u8; 16] = rng().random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    let params = params();
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(
            password.as_bytes(),
            &salt_bytes,
            &mut out,
            scratch.blocks(params.block_count()),
        )
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
    let phc = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| anyhow::anyhow!("argon2: {e}"))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| anyhow::anyhow!("argon2: {e}"))?),
    };
    Ok(phc.to_string())
}

/// Checks a password against a stored PHC string, in constant time for the comparison (slow on
/// purpose: call it off the async runtime). False for anything that is not an argon2 hash.
pub fn verify_password_in(scratch: &mut Scratch, password: &str, hash: &str) -> bool {
    let mut check = || -> Option<bool> {
        let phc = PasswordHash::new(hash).ok()?;
        let algorithm = Algorithm::try_from(phc.algorithm).ok()?;
        let version = phc
            .version
            .map_or(Some(Version::V0x13), |v| Version::try_from(v).ok())?;
        let params = Params::try_from(&phc).ok()?;
        let expected = phc.hash?;
        let mut salt = [0u8; 64];
        let salt = phc.salt?.decode_b64(&mut salt).ok()?;
        let mut out = vec![0u8; expected.len()];
        Argon2::new(algorithm, version, params.clone())
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                scratch.blocks(params.block_count()),
            )
            .ok()?;
        // Output's equality is constant-time.
        Some(Output::new(&out).ok()? == expected)
    };
    check().unwrap_or(false)
}

/// `hash_password_in` with memory of its own (tests, the CLI).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    hash_password_in(&mut Scratch::default(), password)
}

/// `verify_password_in` with memory of its own.
pub fn verify_password(password: &str, hash: &str) -> bool {
    verify_password_in(&mut Scratch::default(), password, hash)
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
    fn hashes_agree_with_the_argon2_crates_own_and_memory_is_reused() {
        use argon2::{PasswordHasher, PasswordVerifier};
        let theirs = Argon2::new(Algorithm::Argon2id, Version::V0x13, params());
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let stored = theirs
            .hash_password(b"pw 1234567", &salt)
            .unwrap()
            .to_string();
        let mut scratch = Scratch::default();
        // Stored hashes made before keep working, and ours verify with the crate's verifier.
        assert!(verify_password_in(&mut scratch, "pw 1234567", &stored));
        assert!(!verify_password_in(&mut scratch, "pw 1234568", &stored));
        let ours = hash_password_in(&mut scratch, "pw 1234567").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(theirs.verify_password(b"pw 1234567", &parsed).is_ok());
        assert_eq!(scratch.0.len(), params().block_count(), "no growth");
        // A hash made with more memory than ours still verifies (the scratch grows for it).
        let bigger = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(20_480, 1, 1, None).unwrap(),
        );
        let stored = bigger.hash_password(b"pw", &salt).unwrap().to_string();
        assert!(verify_password_in(&mut scratch, "pw", &stored));
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
