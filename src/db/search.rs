//! Finding conversations by a word in their title or messages, on both backends: FTS5 on SQLite,
//! a `tsvector` with a GIN index on PostgreSQL (migration 0005). Neither splits Chinese into
//! words, so the program writes each message for the index with every CJK character standing
//! apart (`index_text`) and asks for a query's CJK run as a phrase of adjacent characters: "首都"
//! finds "北京是中国的首都。".

use super::chats::Conversation;
use super::{Backend, Db, DbResult};

/// Longest query taken, in characters, and most words in it.
pub const MAX_QUERY_CHARS: usize = 200;
const MAX_TERMS: usize = 8;
/// Most conversations one search returns.
const LIMIT: i64 = 50;

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF   // kana
        | 0x3400..=0x4DBF // CJK extension A
        | 0x4E00..=0x9FFF // CJK unified ideographs
        | 0xAC00..=0xD7AF // Hangul syllables
        | 0xF900..=0xFAFF // compatibility ideographs
        | 0x20000..=0x2FA1F)
}

/// A text as the index sees it: lower case, each CJK character a word of its own.
pub fn index_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 2);
    for c in text.chars() {
        if is_cjk(c) {
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// The query's words, each written as the index sees it (a CJK run becomes its characters,
/// to be matched as a phrase); words with nothing searchable in them are left out.
pub fn terms(query: &str) -> Vec<String> {
    query
        .split_whitespace()
        .map(|w| {
            index_text(w)
                .split(|c: char| !c.is_alphanumeric())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|t| !t.is_empty())
        .take(MAX_TERMS)
        .collect()
}

/// `LIKE` pattern for `needle` anywhere, with `\` escaping the pattern characters.
fn contains_pattern(needle: &str) -> String {
    let mut p = String::from("%");
    for c in needle.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// The user's browser conversations whose title contains `query` or whose messages hold all of
/// its words, newest first.
pub async fn conversations(db: &Db, user_id: i64, query: &str) -> DbResult<Vec<Conversation>> {
    let terms = terms(query);
    // $1 user, $2 title pattern, $3… the words.
    let words = match db.backend {
        // FTS5: each word a quoted phrase (quotes doubled), all of them required.
        Backend::Sqlite => {
            "m.id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH $3)".to_string()
        }
        Backend::Postgres => (0..terms.len())
            .map(|i| format!("m.search_tsv @@ phraseto_tsquery('simple', ${})", i + 3))
            .collect::<Vec<_>>()
            .join(" AND "),
    };
    let found_in_messages = if terms.is_empty() {
        "FALSE".to_string()
    } else {
        format!("EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND {words})")
    };
    let sql = format!(
        "SELECT {} FROM conversations c WHERE c.user_id = $1 AND c.source = 'web' \
         AND (lower(c.title) LIKE $2 ESCAPE '\\' OR {found_in_messages}) \
         ORDER BY c.updated_at DESC, c.id DESC LIMIT {LIMIT}",
        super::prefixed(super::chats::CONV_COLS, "c")
    );
    let mut q = sqlx::query_as::<_, Conversation>(&sql)
        .bind(user_id)
        .bind(contains_pattern(query.trim()));
    match db.backend {
        Backend::Sqlite if !terms.is_empty() => {
            let phrases: Vec<String> = terms
                .iter()
                .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
                .collect();
            q = q.bind(phrases.join(" "));
        }
        Backend::Sqlite => {}
        Backend::Postgres => {
            for t in &terms {
                q = q.bind(t.clone());
            }
        }
    }
    Ok(q.fetch_all(&db.pool).await?)
}

/// Indexes messages written before search existed (a few hundred at a time, until none is left).
pub async fn index_earlier(db: &Db) -> DbResult<u64> {
    let mut done = 0;
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, content FROM messages WHERE search_text IS NULL ORDER BY id LIMIT 500",
        )
        .fetch_all(&db.pool)
        .await?;
        if rows.is_empty() {
            return Ok(done);
        }
        for (id, content) in rows {
            sqlx::query("UPDATE messages SET search_text = $1 WHERE id = $2")
                .bind(index_text(&content))
                .bind(id)
                .execute(&db.pool)
                .await?;
            done += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cjk_characters_stand_apart_and_latin_words_stay_whole() {
        let indexed = index_text("北京Capital是");
        let words: Vec<&str> = indexed.split_whitespace().collect();
        assert_eq!(words, ["北", "京", "capital", "是"]);
    }

    #[test]
    fn query_words_become_terms() {
        assert_eq!(terms("首都 Paris"), vec!["首 都", "paris"]);
        assert_eq!(terms("\"quoted\" *** it's"), vec!["quoted", "it s"]);
        assert!(terms("  %%% ").is_empty());
    }

    #[test]
    fn title_patterns_escape_like_characters() {
        assert_eq!(contains_pattern("50%_a\\"), "%50\\%\\_a\\\\%");
    }
}
