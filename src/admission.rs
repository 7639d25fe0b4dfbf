//! Admission for generation, decided before any work starts: a bounded number of answers in the
//! system (running + waiting) and per account. A permit travels with the answer and frees its
//! slot when the answer ends, however it ends. Also: when "tomorrow morning" is.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Every slot is taken: 503 overloaded.
    Overloaded,
    /// This account already has its answers in progress: 429 busy.
    Busy,
}

/// The admission controller (cheap to clone).
#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Answers in progress per account.
    users: crate::shares::Shares<i64>,
}

/// A taken slot; dropping it frees the slot and the account's count.
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    _user: crate::shares::Share<i64>,
}

/// A slot taken before it is known whose it is; it becomes a `Permit` in `claim`.
pub struct Slot(OwnedSemaphorePermit);

impl Admission {
    pub fn new(capacity: usize, per_user: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            users: crate::shares::Shares::new(per_user),
        }
    }

    /// Takes a slot without waiting.
    fn try_slot(&self) -> Result<Slot, Shed> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map(Slot)
            .map_err(|_| Shed::Overloaded)
    }

    /// Gives a slot to `user`, unless they already have their answers in progress (the slot is
    /// then freed).
    fn claim(&self, slot: Slot, user: i64) -> Result<Permit, Shed> {
        let share = self.users.try_take(user).ok_or(Shed::Busy)?;
        Ok(Permit {
            _slot: slot.0,
            _user: share,
        })
    }

    /// Takes a slot for `user` without waiting (`try_slot` then `claim`).
    pub fn try_admit(&self, user: i64) -> Result<Permit, Shed> {
        self.claim(self.try_slot()?, user)
    }

    /// Every slot is taken (a hint: a slot may free up a moment later).
    pub fn is_full(&self) -> bool {
        self.slots.available_permits() == 0
    }

    /// Answers in the system now.
    pub fn in_use(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Waits until every answer has ended, at most `timeout`.
    pub async fn drained(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            while self.in_use() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok()
    }
}

/// The next `hour`:00 in UTC`offset` strictly after `now`: when the service "reopens".
pub fn next_reopening(now: SystemTime, hour: u32, utc_offset_hours: i32) -> SystemTime {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let local = secs + utc_offset_hours as i64 * 3600;
    let day_start = local - local.rem_euclid(86_400);
    let mut target = day_start + hour as i64 * 3600;
    if target <= local {
        target += 86_400;
    }
    UNIX_EPOCH + Duration::from_secs((target - utc_offset_hours as i64 * 3600) as u64)
}

/// The calendar day (YYYY-MM-DD) of `now` in UTC`offset`: the key of daily quotas.
pub fn local_day(now: SystemTime, utc_offset_hours: i32) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + utc_offset_hours as i64 * 3600;
    let days = secs.div_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Seconds until the next local midnight (when daily quotas reset).
pub fn secs_until_midnight(now: SystemTime, utc_offset_hours: i32) -> u64 {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + utc_offset_hours as i64 * 3600;
    (86_400 - secs.rem_euclid(86_400)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_per_user_limits() {
        let a = Admission::new(2, 1);
        let p1 = a.try_admit(1).unwrap();
        assert_eq!(a.try_admit(1).err(), Some(Shed::Busy));
        let p2 = a.try_admit(2).unwrap();
        assert_eq!(a.try_admit(3).err(), Some(Shed::Overloaded));
        assert_eq!(a.in_use(), 2);
        drop(p1);
        let _p3 = a.try_admit(3).unwrap();
        assert_eq!(
            a.try_admit(1).err(),
            Some(Shed::Overloaded),
            "user 1 is free, but the slots are not"
        );
        drop(p2);
        assert!(a.try_admit(1).is_ok());
    }

    #[test]
    fn reopening_is_the_next_morning_in_the_configured_zone() {
        // 2026-11-30 00:30 UTC = 08:30 in Shanghai: reopens at 09:00 the same day (01:00 UTC).
        let t = UNIX_EPOCH + Duration::from_secs(1_795_996_800 + 1800);
        assert_eq!(httpdate::fmt_http_date(t), "Mon, 30 Nov 2026 00:30:00 GMT");
        assert_eq!(
            httpdate::fmt_http_date(next_reopening(t, 9, 8)),
            "Mon, 30 Nov 2026 01:00:00 GMT"
        );
        // 02:00 UTC = 10:00 in Shanghai: tomorrow 09:00.
        let t = UNIX_EPOCH + Duration::from_secs(1_795_996_800 + 7200);
        assert_eq!(
            httpdate::fmt_http_date(next_reopening(t, 9, 8)),
            "Tue, 01 Dec 2026 01:00:00 GMT"
        );
        assert_eq!(local_day(t, 8), "2026-11-30");
        assert_eq!(
            local_day(UNIX_EPOCH + Duration::from_secs(1_795_996_800 - 60), 0),
            "2026-11-29"
        );
        assert_eq!(secs_until_midnight(t, 8), 14 * 3600);
    }
}
