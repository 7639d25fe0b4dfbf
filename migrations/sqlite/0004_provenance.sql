-- 0004: who wrote each message, and refusals counted per account wherever they happen.
-- `written_by`: 'user' (a person's question), 'model' (an answer the model generated), 'rules'
-- (a refusal written by the refusal rules), 'caller' (an assistant turn written by an API caller
-- and kept with `store: true`). Only 'model' answers are ever exported as model answers.
ALTER TABLE messages ADD COLUMN written_by TEXT NOT NULL DEFAULT 'model'
    CHECK (written_by IN ('user', 'model', 'rules', 'caller'));
UPDATE messages SET written_by = 'user' WHERE role = 'user';
UPDATE messages SET written_by = 'rules' WHERE role = 'assistant' AND finish_reason = 'refused';

-- Every refusal, on every path (browser, regenerate, API, kept or not): the cool-down counts
-- these, so it holds for API keys too and deleting a conversation does not reset it.
CREATE TABLE refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    rule TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX refusals_user ON refusals(user_id, created_at);
INSERT INTO refusals (user_id, rule, created_at)
    SELECT c.user_id, 'earlier', m.created_at FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE m.written_by = 'rules';
