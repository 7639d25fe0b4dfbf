//! Invite codes: minted hashed, redeemed atomically (one UPDATE … RETURNING, never
//! select-then-update), listed and revoked by prefix.

use super::accounts::AccountRole;
use super::{now_ms, Db, DbError, DbResult};
use crate::secrets::{invite_code, normalize_code, sha256_hex};

/// An invite code as stored (the code itself is not: only its hash and first characters).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Invite {
    pub id: i64,
    pub code_prefix: String,
    pub max_uses: i64,
    pub uses: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub note: String,
    #[sqlx(try_from = "String")]
    pub role: AccountRole,
    pub created_by: Option<i64>,
    pub created_at: i64,
}

impl Invite {
    /// `active`, `used`, `expired` or `revoked`.
    pub fn state(&self) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.uses >= self.max_uses {
            "used"
        } else if self.expires_at.is_some_and(|e| e <= now_ms()) {
            "expired"
        } else {
            "active"
        }
    }
}

/// What to mint.
#[derive(Debug, Clone)]
pub struct InviteSpec {
    pub max_uses: i64,
    pub expires_in_ms: Option<i64>,
    pub note: String,
    /// `User`, or `Admin` for the first operator's code.
    pub role: AccountRole,
    pub created_by: Option<i64>,
}

impl Default for InviteSpec {
    fn default() -> Self {
        Self {
            max_uses: 1,
            expires_in_ms: None,
            note: String::new(),
            role: AccountRole::User,
            created_by: None,
        }
    }
}

/// Stores a new code inside `conn` and returns (id, the code in full — shown once).
pub async fn mint(conn: &mut sqlx::AnyConnection, spec: &InviteSpec) -> DbResult<(i64, String)> {
    let code = invite_code();
    let canonical = normalize_code(&code).expect("fresh codes are valid");
    let now = now_ms();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO invite_codes (code_hash, code_prefix, max_uses, expires_at, note, role, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(sha256_hex(&canonical))
    .bind(&code[..5])
    .bind(spec.max_uses)
    .bind(spec.expires_in_ms.map(|ms| now + ms))
    .bind(&spec.note)
    .bind(spec.role.as_str())
    .bind(spec.created_by)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok((id, code))
}

/// Mints `count` codes in one transaction.
pub async fn mint_many(db: &Db, count: usize, spec: &InviteSpec) -> DbResult<Vec<String>> {
    let mut tx = db.begin().await?;
    let mut codes = Vec::with_capacity(count);
    for _ in 0..count {
        codes.push(mint(&mut tx, spec).await?.1);
    }
    tx.commit().await?;
    Ok(codes)
}

/// Takes one use of `code` if it is valid now; returns the invite's id and the role it grants.
/// Atomic: of many simultaneous redemptions of a single-use code exactly one gets `Some`.
pub async fn redeem(
    conn: &mut sqlx::AnyConnection,
    code: &str,
) -> DbResult<Option<(i64, AccountRole)>> {
    let Some(canonical) = normalize_code(code) else {
        return Ok(None);
    };
    let now = now_ms();
    let row: Option<(i64, String)> = sqlx::query_as(
        "UPDATE invite_codes SET uses = uses + 1 \
         WHERE code_hash = $1 AND uses < max_uses AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2) \
         RETURNING id, role",
    )
    .bind(sha256_hex(&canonical))
    .bind(now)
    .fetch_optional(conn)
    .await?;
    row.map(|(id, role)| {
        Ok((
            id,
            AccountRole::try_from(role).map_err(|e| DbError::Other(e.to_string()))?,
        ))
    })
    .transpose()
}

/// True when `code` could be redeemed now (a read only: `redeem` decides, atomically). Lets
/// registration refuse a wrong code before it spends a password hash on it.
pub async fn is_redeemable(db: &Db, code: &str) -> DbResult<bool> {
    let Some(canonical) = normalize_code(code) else {
        return Ok(false);
    };
    let found: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM invite_codes \
         WHERE code_hash = $1 AND uses < max_uses AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
    )
    .bind(sha256_hex(&canonical))
    .bind(now_ms())
    .fetch_optional(&db.pool)
    .await?;
    Ok(found.is_some())
}

const INVITE_COLS: &str =
    "id, code_prefix, max_uses, uses, expires_at, revoked_at, note, role, created_by, created_at";

pub async fn list(db: &Db) -> DbResult<Vec<Invite>> {
    let sql = format!("SELECT {INVITE_COLS} FROM invite_codes ORDER BY id DESC");
    Ok(sqlx::query_as::<_, Invite>(&sql)
        .fetch_all(&db.pool)
        .await?)
}

/// Revokes a code given in full (or by id); false when there is no such code.
pub async fn revoke(db: &Db, code: &str) -> DbResult<bool> {
    let Some(canonical) = normalize_code(code) else {
        return Ok(false);
    };
    let r = sqlx::query(
        "UPDATE invite_codes SET revoked_at = $1 WHERE code_hash = $2 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(sha256_hex(&canonical))
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

pub async fn revoke_by_id(db: &Db, id: i64) -> DbResult<bool> {
    let r =
        sqlx::query("UPDATE invite_codes SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(&db.pool)
            .await?;
    Ok(r.rows_affected() > 0)
}
