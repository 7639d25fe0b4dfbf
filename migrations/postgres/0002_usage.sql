-- 0002: daily token usage per account and for the whole service, shared by every replica.
-- `day` is the calendar day (YYYY-MM-DD) in limits.utc_offset_hours.

CREATE TABLE usage_daily (
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    day TEXT NOT NULL,
    tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);

CREATE TABLE service_usage_daily (
    day TEXT PRIMARY KEY,
    tokens BIGINT NOT NULL DEFAULT 0
);
