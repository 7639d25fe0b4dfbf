//! A conversation as a tree: every message follows its parent, and editing a question or
//! regenerating an answer adds a sibling. What is shown, and what the model reads, is one path
//! from a first question to the conversation's leaf; switching to a sibling moves the leaf to the
//! newest end of that sibling's branch.

use std::collections::HashMap;

use super::chats::Message;
use super::{Db, DbResult};

/// The messages from the first question to `leaf` (all of them, oldest first, when the
/// conversation has no leaf recorded).
pub fn path_to(all: &[Message], leaf: Option<i64>) -> Vec<&Message> {
    let by_id: HashMap<i64, &Message> = all.iter().map(|m| (m.id, m)).collect();
    let mut path = Vec::new();
    let mut at = leaf.and_then(|id| by_id.get(&id).copied());
    // A parent is always an earlier message, so this walk ends; the bound guards bad data.
    while let Some(m) = at {
        if path.len() > all.len() {
            break;
        }
        path.push(m);
        at = m.parent_id.and_then(|p| by_id.get(&p).copied());
    }
    path.reverse();
    path
}

/// The ids of the messages that follow the same parent as `m` (itself included), oldest first.
pub fn siblings(all: &[Message], m: &Message) -> Vec<i64> {
    let mut ids: Vec<i64> = all
        .iter()
        .filter(|o| o.parent_id == m.parent_id)
        .map(|o| o.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// The end of the branch through `from`: from it, the newest message following each step.
pub fn newest_end(all: &[Message], from: i64) -> i64 {
    let mut newest_child: HashMap<i64, i64> = HashMap::new();
    for m in all {
        if let Some(p) = m.parent_id {
            let e = newest_child.entry(p).or_insert(m.id);
            *e = (*e).max(m.id);
        }
    }
    let mut at = from;
    for _ in 0..=all.len() {
        match newest_child.get(&at) {
            Some(&next) => at = next,
            None => break,
        }
    }
    at
}

/// Makes `leaf` the end of the branch being viewed (false when the conversation is not the
/// user's).
pub async fn set_leaf(db: &Db, user_id: i64, conversation_id: i64, leaf: i64) -> DbResult<bool> {
    let r = sqlx::query("UPDATE conversations SET leaf_id = $1 WHERE id = $2 AND user_id = $3")
        .bind(leaf)
        .bind(conversation_id)
        .bind(user_id)
        .execute(&db.pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::chats::{Author, MessageRole};

    fn m(id: i64, parent: Option<i64>) -> Message {
        Message {
            id,
            conversation_id: 1,
            role: if id % 2 == 1 {
                MessageRole::User
            } else {
                MessageRole::Assistant
            },
            content: format!("m{id}"),
            finish_reason: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            created_at: 0,
            written_by: Author::User,
            parent_id: parent,
            rating: None,
        }
    }

    /// 1 → 2 → 3 → 4, with 3 edited as 5 (→ 6, regenerated as 8) and 4 regenerated as 7.
    fn tree() -> Vec<Message> {
        vec![
            m(1, None),
            m(2, Some(1)),
            m(3, Some(2)),
            m(4, Some(3)),
            m(5, Some(2)),
            m(6, Some(5)),
            m(7, Some(3)),
            m(8, Some(5)),
        ]
    }

    #[test]
    fn a_path_runs_from_the_first_question_to_the_leaf() {
        let all = tree();
        let ids = |leaf| path_to(&all, leaf).iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(ids(Some(6)), [1, 2, 5, 6]);
        assert_eq!(ids(Some(7)), [1, 2, 3, 7]);
        assert!(ids(None).is_empty());
        assert!(ids(Some(99)).is_empty());
    }

    #[test]
    fn siblings_share_a_parent() {
        let all = tree();
        assert_eq!(siblings(&all, &all[2]), [3, 5]);
        assert_eq!(siblings(&all, &all[3]), [4, 7]);
        assert_eq!(siblings(&all, &all[0]), [1]);
    }

    #[test]
    fn switching_goes_to_the_newest_end_of_a_branch() {
        let all = tree();
        assert_eq!(newest_end(&all, 3), 7);
        assert_eq!(newest_end(&all, 5), 8);
        assert_eq!(newest_end(&all, 8), 8);
        assert_eq!(newest_end(&all, 1), 8);
    }
}
