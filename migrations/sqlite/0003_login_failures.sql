-- 0003: failed sign-ins counted per account *and* client address, so that someone guessing
-- from one address slows down only their own attempts, never the owner's from elsewhere.
-- (users.failed_logins and users.login_blocked_until from 0001 are no longer used.)

CREATE TABLE login_failures (
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    -- the client's rate-limit key: an IPv4 address or an IPv6 /64
    client TEXT NOT NULL,
    failures BIGINT NOT NULL DEFAULT 0,
    blocked_until BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, client)
);
CREATE INDEX login_failures_age ON login_failures(updated_at);
CREATE INDEX password_resets_user ON password_resets(user_id, created_at);
