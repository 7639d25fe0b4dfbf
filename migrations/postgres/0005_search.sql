-- 0005: full-text search over messages. `search_text` is the message as the index sees it
-- (written by the program: Chinese, Japanese and Korean characters stand apart, so each is a word
-- and a phrase of them finds any word inside a sentence); the 'simple' configuration (no stemming,
-- no stop words) indexes it. Rows written before this migration are indexed by the program at start.
ALTER TABLE messages ADD COLUMN search_text TEXT;
ALTER TABLE messages ADD COLUMN search_tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', coalesce(search_text, ''))) STORED;
CREATE INDEX messages_search ON messages USING GIN (search_tsv);
-- Messages the program has not indexed yet (those written before this migration), found at start
-- without reading the whole table.
CREATE INDEX messages_unindexed ON messages(id) WHERE search_text IS NULL;
