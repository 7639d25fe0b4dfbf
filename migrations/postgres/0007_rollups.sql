-- 0007: what the dashboard draws, per minute and per replica (each process writes its own rows,
-- so replicas add up and a restart loses nothing but the seconds since its last write).
-- `metric` names a counter of that minute (answers, refusals, sheds, tokens, waits, time to
-- first token by bucket) or the highest queue depth seen in it. Old minutes are pruned.
CREATE TABLE rollups (
    minute BIGINT NOT NULL,
    replica TEXT NOT NULL,
    metric TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (minute, replica, metric)
);
CREATE INDEX rollups_minute ON rollups(minute);
