-- 0008: automatic admission's decisions, one per interval (`slot`: Unix seconds / interval). The
-- primary key makes each interval's decision once, whichever replica gets there first; the rows
-- are the log the operator reads ("admitted 5", "paused: 12 % shed").
CREATE TABLE auto_admissions (
    slot BIGINT PRIMARY KEY,
    admitted BIGINT NOT NULL,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
