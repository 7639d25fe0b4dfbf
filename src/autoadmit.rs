//! Admission by capacity: at each interval, the last hour of the dashboard's rollups (every
//! replica's) decides whether the service can take more people — few requests turned away as
//! busy or overloaded, short waits in line — and then the next confirmed waitlist entries are
//! admitted, or admission pauses until the service recovers. One decision per interval across
//! replicas (its row's primary key), each one logged.

use std::time::Duration;

use crate::config::{AutoAdmitConfig, Config};
use crate::db::waitlist::Pick;
use crate::db::{now_ms, rollups, Db, DbResult};
use crate::tally::{Metric, Outcome};

/// What the recent past looked like.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// Requests to start an answer: answered or refused, and turned away (busy, overloaded).
    pub served: f64,
    pub shed: f64,
    pub wait_ms: f64,
    pub waits: f64,
}

/// What an interval decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Admit(i64),
    Pause(String),
}

/// The rule, on its own: admit while the shed share and the mean wait stay under their limits
/// (a quiet service — nothing asked — has room).
pub fn decide(w: &Window, cfg: &AutoAdmitConfig) -> Decision {
    let asked = w.served + w.shed;
    let shed_percent = if asked > 0.0 {
        100.0 * w.shed / asked
    } else {
        0.0
    };
    let wait_secs = if w.waits > 0.0 {
        w.wait_ms / w.waits / 1000.0
    } else {
        0.0
    };
    if shed_percent > cfg.max_shed_percent {
        return Decision::Pause(format!("{shed_percent:.1} % of requests were turned away"));
    }
    if wait_secs > cfg.max_wait_secs {
        return Decision::Pause(format!("answers waited {wait_secs:.1} s on average"));
    }
    Decision::Admit(cfg.per_interval)
}

/// The window of the last `minutes`, from the rollups.
pub async fn window(db: &Db, minutes: i64) -> DbResult<Window> {
    let since = now_ms() / 60_000 - minutes;
    let mut w = Window::default();
    for (_, name, value) in rollups::series(db, since).await? {
        match Metric::from_name(&name) {
            Some(Metric::Outcome(Outcome::Answered | Outcome::Refused)) => w.served += value,
            Some(Metric::Outcome(Outcome::Busy | Outcome::Overloaded)) => w.shed += value,
            Some(Metric::WaitMs) => w.wait_ms += value,
            Some(Metric::Waits) => w.waits += value,
            _ => {}
        }
    }
    Ok(w)
}

/// Decides interval `slot` (once across replicas: None when another replica already did) and
/// admits what it decided.
pub async fn tick(db: &Db, config: &Config, slot: i64) -> DbResult<Option<Decision>> {
    let cfg = &config.waitlist.auto;
    let decision = decide(&window(db, cfg.lookback_minutes).await?, cfg);
    let claimed = sqlx::query(
        "INSERT INTO auto_admissions (slot, admitted, reason, created_at) VALUES ($1, 0, '', $2) \
         ON CONFLICT (slot) DO NOTHING",
    )
    .bind(slot)
    .bind(now_ms())
    .execute(&db.pool)
    .await?;
    if claimed.rows_affected() == 0 {
        return Ok(None);
    }
    let (admitted, reason) = match &decision {
        Decision::Admit(n) => {
            let done = crate::admin::admit(db, config, Pick::Oldest(*n), None).await?;
            (done.len() as i64, format!("admitted {}", done.len()))
        }
        Decision::Pause(why) => (0, format!("paused: {why}")),
    };
    tracing::info!(slot, admitted, "automatic admission: {reason}");
    sqlx::query("UPDATE auto_admissions SET admitted = $1, reason = $2 WHERE slot = $3")
        .bind(admitted)
        .bind(&reason)
        .bind(slot)
        .execute(&db.pool)
        .await?;
    Ok(Some(decision))
}

/// With automatic admission on, about how long until the entry at `position` is admitted at
/// the configured pace (when the service keeps up; a pause makes it longer).
pub fn eta_secs(cfg: &AutoAdmitConfig, position: i64) -> Option<u64> {
    if !cfg.enabled || position < 1 {
        return None;
    }
    let intervals = (position as u64).div_ceil(cfg.per_interval.max(1) as u64);
    Some(intervals * cfg.every_secs)
}

/// "about 3 hours", in English and Chinese.
pub fn in_words(secs: u64) -> (String, String) {
    match secs {
        s if s < 3600 => {
            let m = s.div_ceil(60);
            (format!("about {m} minutes"), format!("约 {m} 分钟"))
        }
        s if s < 2 * 86_400 => {
            let h = s.div_ceil(3600);
            (format!("about {h} hours"), format!("约 {h} 小时"))
        }
        s => {
            let d = s.div_ceil(86_400);
            (format!("about {d} days"), format!("约 {d} 天"))
        }
    }
}

/// The latest decisions, newest first: (slot start in ms, admitted, reason).
pub async fn log(db: &Db, every_secs: u64, limit: i64) -> DbResult<Vec<(i64, i64, String)>> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT slot, admitted, reason FROM auto_admissions ORDER BY slot DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(slot, n, why)| (slot * every_secs as i64 * 1000, n, why))
        .collect())
}

/// Runs `tick` every `every_secs` while enabled.
pub fn spawn(db: Db, config: std::sync::Arc<Config>) {
    let cfg = config.waitlist.auto.clone();
    if !cfg.enabled {
        return;
    }
    tokio::spawn(async move {
        let every = Duration::from_secs(cfg.every_secs);
        // The first decision one interval after start: a starting replica has no recent past.
        let mut tick_at = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick_at.tick().await;
            let slot = now_ms() / 1000 / cfg.every_secs as i64;
            if let Err(e) = tick(&db, &config, slot).await {
                tracing::warn!("automatic admission failed: {e}");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AutoAdmitConfig {
        AutoAdmitConfig {
            enabled: true,
            every_secs: 60,
            per_interval: 5,
            lookback_minutes: 60,
            max_shed_percent: 5.0,
            max_wait_secs: 10.0,
        }
    }

    #[test]
    fn the_estimate_follows_the_pace() {
        let mut c = cfg();
        assert_eq!(
            eta_secs(&c, 12),
            Some(3 * 60),
            "5 per minute: the 12th in the third"
        );
        c.enabled = false;
        assert_eq!(eta_secs(&c, 12), None);
        assert_eq!(in_words(3 * 3600).0, "about 3 hours");
        assert_eq!(in_words(90).1, "约 2 分钟");
    }

    #[test]
    fn it_pauses_while_the_service_sheds_or_keeps_people_waiting() {
        let quiet = Window::default();
        assert_eq!(decide(&quiet, &cfg()), Decision::Admit(5));
        let shedding = Window {
            served: 90.0,
            shed: 10.0,
            ..Window::default()
        };
        assert!(matches!(decide(&shedding, &cfg()), Decision::Pause(_)));
        let slow = Window {
            served: 10.0,
            wait_ms: 200_000.0,
            waits: 10.0,
            ..Window::default()
        };
        assert!(matches!(decide(&slow, &cfg()), Decision::Pause(_)));
        let fine = Window {
            served: 100.0,
            shed: 2.0,
            wait_ms: 5_000.0,
            waits: 10.0,
        };
        assert_eq!(decide(&fine, &cfg()), Decision::Admit(5));
    }
}
