-- 0006: a conversation is a tree. Each message follows its parent (NULL: the first question);
-- editing a question or regenerating an answer adds a sibling instead of replacing anything.
-- `leaf_id` is the last message of the branch being viewed: the model sees the path from the
-- first question to it. Earlier conversations become one branch each, as they were.
ALTER TABLE messages ADD COLUMN parent_id BIGINT REFERENCES messages(id) ON DELETE CASCADE;
UPDATE messages SET parent_id = (SELECT MAX(p.id) FROM messages p
    WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id);
CREATE INDEX messages_parent ON messages(parent_id);
ALTER TABLE conversations ADD COLUMN leaf_id BIGINT;
UPDATE conversations SET leaf_id = (SELECT MAX(m.id) FROM messages m WHERE m.conversation_id = conversations.id);
