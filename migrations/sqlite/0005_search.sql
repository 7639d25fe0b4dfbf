-- 0005: full-text search over messages. `search_text` is the message as the index sees it
-- (written by the program: Chinese, Japanese and Korean characters stand apart, so each is a word
-- and a phrase of them finds any word inside a sentence); FTS5 keeps its index in step through
-- the triggers. Rows written before this migration are indexed by the program at start.
ALTER TABLE messages ADD COLUMN search_text TEXT;
CREATE VIRTUAL TABLE messages_fts USING fts5(search_text, content='messages', content_rowid='id');
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, search_text) VALUES (new.id, new.search_text);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, search_text) VALUES ('delete', old.id, old.search_text);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF search_text ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, search_text) VALUES ('delete', old.id, old.search_text);
    INSERT INTO messages_fts(rowid, search_text) VALUES (new.id, new.search_text);
END;
-- Messages the program has not indexed yet (those written before this migration), found at start
-- without reading the whole table.
CREATE INDEX messages_unindexed ON messages(id) WHERE search_text IS NULL;
