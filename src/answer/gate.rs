//! One gate for every answer, on every path: the account's cool-down, the refusal rules (on every
//! turn the caller wrote), a generation slot taken without waiting, the daily budgets — in that
//! order, each outcome typed. A refusal is counted toward the cool-down wherever it happens.

use super::{AnswerError, Answers};
use crate::admission::{Permit, Shed};
use crate::db::{chats, now_ms};
use crate::policy::Refusal;
use crate::tally::Outcome;

/// What the gate decided.
pub enum Decision {
    /// The rules answer; the model does not run (no slot is taken).
    Refuse(Refusal),
    /// The model answers, holding this slot until the answer ends.
    Answer(Permit),
}

impl Answers {
    /// Decides on a request by `user_id` whose caller wrote `texts`.
    pub async fn gate<'a>(
        &self,
        user_id: i64,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<Decision, AnswerError> {
        let decided = self.decide(user_id, texts).await;
        let outcome = match &decided {
            Ok(Decision::Refuse(_)) | Err(AnswerError::Cooldown { .. }) => Some(Outcome::Refused),
            Err(AnswerError::Busy) => Some(Outcome::Busy),
            Err(AnswerError::Overloaded) => Some(Outcome::Overloaded),
            Err(AnswerError::QuotaExceeded { .. }) => Some(Outcome::OverQuota),
            _ => None, // answered: counted when the answer is made
        };
        if let Some(o) = outcome {
            self.tally.outcome(o);
        }
        decided
    }

    async fn decide<'a>(
        &self,
        user_id: i64,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<Decision, AnswerError> {
        if let Some(ms) = self.cooldown_left(user_id).await? {
            return Err(AnswerError::Cooldown {
                retry_after_secs: (ms as u64).div_ceil(1000).max(1),
            });
        }
        if let Some(refusal) = self.policy.check_all(texts) {
            tracing::info!(rule = %refusal.rule, "request refused by policy");
            chats::record_refusal(&self.db, user_id, &refusal.rule).await?;
            return Ok(Decision::Refuse(refusal));
        }
        let permit = self
            .admission
            .try_admit(user_id)
            .map_err(|shed| match shed {
                Shed::Busy => AnswerError::Busy,
                Shed::Overloaded => AnswerError::Overloaded,
            })?;
        self.check_quota(user_id).await?;
        Ok(Decision::Answer(permit))
    }

    /// Milliseconds until the user's refusal cool-down ends, if they are in one.
    async fn cooldown_left(&self, user_id: i64) -> Result<Option<i64>, AnswerError> {
        let r = &self.config.refusals;
        if r.cooldown_after <= 0 {
            return Ok(None);
        }
        let now = now_ms();
        let times =
            chats::refusal_times(&self.db, user_id, now - r.window_minutes * 60_000).await?;
        if (times.len() as i64) < r.cooldown_after {
            return Ok(None);
        }
        let until = times[0] + r.cooldown_minutes * 60_000;
        Ok((until > now).then_some(until - now))
    }

    /// The account's and the service's daily token budgets.
    async fn check_quota(&self, user_id: i64) -> Result<(), AnswerError> {
        let l = &self.config.limits;
        let now = std::time::SystemTime::now();
        let day = crate::admission::local_day(now, l.utc_offset_hours);
        if l.daily_user_tokens > 0
            && crate::db::usage::user_tokens(&self.db, user_id, &day).await? >= l.daily_user_tokens
        {
            return Err(AnswerError::QuotaExceeded {
                retry_after_secs: crate::admission::secs_until_midnight(now, l.utc_offset_hours),
            });
        }
        if l.daily_service_tokens > 0
            && crate::db::usage::service_tokens(&self.db, &day).await? >= l.daily_service_tokens
        {
            return Err(AnswerError::Overloaded);
        }
        Ok(())
    }
}
