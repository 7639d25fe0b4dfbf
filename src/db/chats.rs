//! Conversations, their messages, and feedback on answers. Every lookup is scoped to the owner
//! in the SQL itself: someone else's id simply finds nothing.

use super::{now_ms, Db, DbResult, UnknownValue};

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Conversation {
    pub id: i64,
    pub title: String,
    pub exclude_from_training: i64,
    pub source: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// The last message of the branch being viewed.
    pub leaf_id: Option<i64>,
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Message {
    pub id: i64,
    pub conversation_id: i64,
    #[sqlx(try_from = "String")]
    pub role: MessageRole,
    pub content: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub created_at: i64,
    #[sqlx(try_from = "String")]
    #[serde(skip)]
    pub written_by: Author,
    /// The message this one follows in its branch (None: a first question).
    pub parent_id: Option<i64>,
    /// The owner's rating of this answer (1 or -1), where the query asks for it (`messages`).
    #[sqlx(default)]
    pub rating: Option<i64>,
}

/// Which side of the conversation a message is on (the `role` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    User,
    Assistant,
}

impl MessageRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::User => "user",
            MessageRole::Assistant => "assistant",
        }
    }
}

impl TryFrom<String> for MessageRole {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        match s.as_str() {
            "user" => Ok(MessageRole::User),
            "assistant" => Ok(MessageRole::Assistant),
            _ => Err(UnknownValue(s)),
        }
    }
}

pub(crate) const CONV_COLS: &str =
    "id, title, exclude_from_training, source, created_at, updated_at, leaf_id";
const MSG_COLS: &str = "id, conversation_id, role, content, finish_reason, prompt_tokens, completion_tokens, created_at, written_by, parent_id";

pub async fn create_conversation(
    db: &Db,
    user_id: i64,
    title: &str,
    source: &str,
) -> DbResult<Conversation> {
    let now = now_ms();
    let sql = format!(
        "INSERT INTO conversations (user_id, title, source, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) RETURNING {CONV_COLS}"
    );
    Ok(sqlx::query_as::<_, Conversation>(&sql)
        .bind(user_id)
        .bind(title)
        .bind(source)
        .bind(now)
        .fetch_one(&db.pool)
        .await?)
}

/// The user's conversations from the browser, newest first.
pub async fn list_conversations(db: &Db, user_id: i64) -> DbResult<Vec<Conversation>> {
    let sql = format!(
        "SELECT {CONV_COLS} FROM conversations WHERE user_id = $1 AND source = 'web' ORDER BY updated_at DESC, id DESC"
    );
    Ok(sqlx::query_as::<_, Conversation>(&sql)
        .bind(user_id)
        .fetch_all(&db.pool)
        .await?)
}

pub async fn conversation(db: &Db, user_id: i64, id: i64) -> DbResult<Option<Conversation>> {
    let sql = format!("SELECT {CONV_COLS} FROM conversations WHERE id = $1 AND user_id = $2");
    Ok(sqlx::query_as::<_, Conversation>(&sql)
        .bind(id)
        .bind(user_id)
        .fetch_optional(&db.pool)
        .await?)
}

pub async fn messages(db: &Db, user_id: i64, conversation_id: i64) -> DbResult<Vec<Message>> {
    let sql = format!(
        "SELECT {}, (SELECT f.rating FROM feedback f WHERE f.message_id = m.id AND f.user_id = c.user_id) AS rating \
         FROM messages m JOIN conversations c ON c.id = m.conversation_id \
         WHERE m.conversation_id = $1 AND c.user_id = $2 ORDER BY m.id",
        super::prefixed(MSG_COLS, "m")
    );
    Ok(sqlx::query_as::<_, Message>(&sql)
        .bind(conversation_id)
        .bind(user_id)
        .fetch_all(&db.pool)
        .await?)
}

/// Changes title and/or the training opt-out; false when the conversation is not the user's.
pub async fn update_conversation(
    db: &Db,
    user_id: i64,
    id: i64,
    title: Option<&str>,
    exclude_from_training: Option<bool>,
) -> DbResult<bool> {
    let r = sqlx::query(
        "UPDATE conversations SET title = COALESCE($1, title), \
         exclude_from_training = COALESCE($2, exclude_from_training), updated_at = $3 \
         WHERE id = $4 AND user_id = $5",
    )
    .bind(title)
    .bind(exclude_from_training.map(i64::from))
    .bind(now_ms())
    .bind(id)
    .bind(user_id)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

pub async fn delete_conversation(db: &Db, user_id: i64, id: i64) -> DbResult<bool> {
    let r = sqlx::query("DELETE FROM conversations WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user_id)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// What a new message is made of.
/// Who wrote a message (the `written_by` column). Only `Model` answers are model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Author {
    /// A person's question (role `user`).
    User,
    /// An answer the model generated.
    Model,
    /// A refusal written by the refusal rules.
    Rules,
    /// An assistant turn written by an API caller, kept with `store: true`.
    Caller,
}

impl Author {
    pub fn role(self) -> MessageRole {
        match self {
            Author::User => MessageRole::User,
            Author::Model | Author::Rules | Author::Caller => MessageRole::Assistant,
        }
    }

    fn column(self) -> &'static str {
        match self {
            Author::User => "user",
            Author::Model => "model",
            Author::Rules => "rules",
            Author::Caller => "caller",
        }
    }
}

impl TryFrom<String> for Author {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, UnknownValue> {
        match s.as_str() {
            "user" => Ok(Author::User),
            "model" => Ok(Author::Model),
            "rules" => Ok(Author::Rules),
            "caller" => Ok(Author::Caller),
            _ => Err(UnknownValue(s)),
        }
    }
}

pub struct NewMessage<'a> {
    pub author: Author,
    pub place: Place,
    pub content: &'a str,
    pub finish_reason: Option<&'a str>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// Where a new message goes in the conversation's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// After the last message of the branch being viewed.
    AtLeaf,
    /// After this message (None: as a first question), beside any that already follow it.
    Under(Option<i64>),
}

/// Adds a message to the user's conversation (None when it is not theirs), makes it the end of
/// the branch being viewed and bumps the conversation's time.
pub async fn add_message(
    db: &Db,
    user_id: i64,
    conversation_id: i64,
    m: &NewMessage<'_>,
) -> DbResult<Option<Message>> {
    let mut tx = db.begin().await?;
    let now = now_ms();
    // The conversation's row is written first, so two messages added at once queue up here
    // and each finds the other's leaf.
    let owned: Option<Option<i64>> = sqlx::query_scalar(
        "UPDATE conversations SET updated_at = $1 WHERE id = $2 AND user_id = $3 RETURNING leaf_id",
    )
    .bind(now)
    .bind(conversation_id)
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(leaf) = owned else {
        return Ok(None);
    };
    let parent = match m.place {
        Place::AtLeaf => leaf,
        Place::Under(parent) => parent,
    };
    let sql = format!(
        "INSERT INTO messages (conversation_id, role, content, finish_reason, prompt_tokens, completion_tokens, created_at, written_by, search_text, parent_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {MSG_COLS}"
    );
    let msg = sqlx::query_as::<_, Message>(&sql)
        .bind(conversation_id)
        .bind(m.author.role().as_str())
        .bind(m.content)
        .bind(m.finish_reason)
        .bind(m.prompt_tokens)
        .bind(m.completion_tokens)
        .bind(now)
        .bind(m.author.column())
        .bind(super::search::index_text(m.content))
        .bind(parent)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("UPDATE conversations SET leaf_id = $1 WHERE id = $2")
        .bind(msg.id)
        .bind(conversation_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(msg))
}

/// A message of the user's own conversations.
pub async fn owned_message(db: &Db, user_id: i64, message_id: i64) -> DbResult<Option<Message>> {
    let sql = format!(
        "SELECT {} FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.id = $1 AND c.user_id = $2",
        super::prefixed(MSG_COLS, "m")
    );
    Ok(sqlx::query_as::<_, Message>(&sql)
        .bind(message_id)
        .bind(user_id)
        .fetch_optional(&db.pool)
        .await?)
}

/// Takes back a question nothing answered: it goes (with anything under it), and the branch
/// being viewed ends where it began again.
pub async fn take_back(db: &Db, conversation_id: i64, message_id: i64) -> DbResult<()> {
    let mut tx = db.begin().await?;
    let parent: Option<Option<i64>> =
        sqlx::query_scalar("SELECT parent_id FROM messages WHERE id = $1 AND conversation_id = $2")
            .bind(message_id)
            .bind(conversation_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(parent) = parent else {
        return Ok(());
    };
    sqlx::query("DELETE FROM messages WHERE id = $1")
        .bind(message_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE conversations SET leaf_id = $1 WHERE id = $2 AND leaf_id = $3")
        .bind(parent)
        .bind(conversation_id)
        .bind(message_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Gives an untitled conversation a title.
pub async fn set_title_if_empty(db: &Db, conversation_id: i64, title: &str) -> DbResult<()> {
    sqlx::query("UPDATE conversations SET title = $1 WHERE id = $2 AND title = ''")
        .bind(title)
        .bind(conversation_id)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Records a refusal of the user's request (on any path, kept in a conversation or not).
pub async fn record_refusal(db: &Db, user_id: i64, rule: &str) -> DbResult<()> {
    sqlx::query("INSERT INTO refusals (user_id, rule, created_at) VALUES ($1, $2, $3)")
        .bind(user_id)
        .bind(rule)
        .bind(now_ms())
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Times of the user's refused requests since `since_ms`, newest first.
pub async fn refusal_times(db: &Db, user_id: i64, since_ms: i64) -> DbResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT created_at FROM refusals WHERE user_id = $1 AND created_at > $2 ORDER BY created_at DESC",
    )
    .bind(user_id)
    .bind(since_ms)
    .fetch_all(&db.pool)
    .await?)
}
