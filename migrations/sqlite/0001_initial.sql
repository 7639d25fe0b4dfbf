-- 0001: accounts, sessions, invites, waitlist, outbox, consent, conversations, feedback, API keys.
-- Times are Unix milliseconds (BIGINT) and flags are 0/1 integers, so the same SQL and the same
-- Rust types serve SQLite and PostgreSQL. Secrets (session ids, invite codes, tokens, API keys)
-- are stored only as SHA-256 hashes.

CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    -- random pseudonym that consent records refer to; nothing links it to the person once the row is gone
    pseudonym TEXT NOT NULL UNIQUE,
    locale TEXT NOT NULL DEFAULT 'en',
    invite_id BIGINT,
    failed_logins BIGINT NOT NULL DEFAULT 0,
    login_blocked_until BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions(user_id);

CREATE TABLE invite_codes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    code_hash TEXT NOT NULL UNIQUE,
    -- first characters of the code, for lists and revocation messages
    code_prefix TEXT NOT NULL,
    max_uses BIGINT NOT NULL DEFAULT 1,
    uses BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT,
    revoked_at BIGINT,
    note TEXT NOT NULL DEFAULT '',
    -- the role an account registered with this code gets (the first admin's code says 'admin')
    role TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    created_by BIGINT REFERENCES users(id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE waitlist (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT NOT NULL UNIQUE,
    locale TEXT NOT NULL DEFAULT 'en',
    -- hash of the private token in the confirmation / status link
    token_hash TEXT NOT NULL UNIQUE,
    confirmed_at BIGINT,
    confirm_sent_at BIGINT,
    invited_at BIGINT,
    invite_id BIGINT REFERENCES invite_codes(id) ON DELETE SET NULL,
    registered_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX waitlist_queue ON waitlist(confirmed_at, id);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    to_email TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    sent_at BIGINT,
    failed_at BIGINT,
    last_error TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);
CREATE INDEX outbox_pending ON outbox(sent_at, next_attempt_at);

CREATE TABLE password_resets (
    token_hash TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);

-- Append-only: triggers below refuse UPDATE and DELETE.
CREATE TABLE consent_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    purpose TEXT NOT NULL,
    granted BIGINT NOT NULL,
    text_version TEXT NOT NULL,
    method TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX consent_subject ON consent_records(subject, purpose, id);
CREATE TRIGGER consent_records_no_update BEFORE UPDATE ON consent_records
BEGIN SELECT RAISE(ABORT, 'consent records are append-only'); END;
CREATE TRIGGER consent_records_no_delete BEFORE DELETE ON consent_records
BEGIN SELECT RAISE(ABORT, 'consent records are append-only'); END;

CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title TEXT NOT NULL DEFAULT '',
    exclude_from_training BIGINT NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'web',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX conversations_user ON conversations(user_id, updated_at);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id BIGINT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE INDEX messages_conversation ON messages(conversation_id, id);

CREATE TABLE feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id BIGINT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    rating BIGINT NOT NULL CHECK (rating IN (-1, 1)),
    comment TEXT NOT NULL DEFAULT '',
    -- 1 when the user's consent was granted at the moment of (the latest) rating
    consented BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (message_id, user_id)
);

CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL DEFAULT '',
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_user ON api_keys(user_id);
