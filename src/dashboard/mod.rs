//! The operator's dashboard: what the service did over the last hour, day or week, from the
//! per-minute rollups every replica writes (`writer`) and from the tables themselves (waitlist,
//! ratings, who asked), drawn as charts on the server (`svg`).

mod svg;

use std::collections::HashMap;
use std::time::Duration;

use crate::answer::Answers;
use crate::db::rollups::{self, Write};
use crate::db::{now_ms, Db, DbResult};
use crate::tally::{Metric, FIRST_TOKEN_BOUNDS};

/// How far back a dashboard looks, and how wide each point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    Hour,
    Day,
    Week,
}

impl Range {
    /// (points, minutes per point)
    fn shape(self) -> (i64, i64) {
        match self {
            Range::Hour => (60, 1),
            Range::Day => (96, 15),
            Range::Week => (84, 120),
        }
    }
}

/// One chart, ready for the page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Chart {
    pub id: &'static str,
    pub title_en: &'static str,
    pub title_zh: &'static str,
    pub svg: String,
    /// The total (or the peak, for depths and times) over the range, for a number beside it.
    pub summary: f64,
}

/// Writes what this process counted into the rollups every `every`, under `replica`; prunes
/// minutes older than `keep_days` once an hour.
pub fn spawn_writer(db: Db, answers: Answers, replica: String, every: Duration, keep_days: i64) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut pruned_at = 0i64;
        loop {
            tick.tick().await;
            if let Err(e) = write_once(&db, &answers, &replica).await {
                tracing::warn!("writing the dashboard's rollups failed: {e}");
            }
            let minute = now_ms() / 60_000;
            if minute - pruned_at >= 60 {
                pruned_at = minute;
                if let Err(e) = rollups::prune(&db, minute - keep_days * 1440).await {
                    tracing::warn!("pruning the dashboard's rollups failed: {e}");
                }
            }
        }
    });
}

/// Adds what was counted since the last write to this minute's rows (counts that could not be
/// written are counted again next time).
pub async fn write_once(db: &Db, answers: &Answers, replica: &str) -> DbResult<()> {
    let taken = answers.tally.take();
    let depth = answers.backend.load() as f64;
    let names: Vec<(Metric, f64)> = taken
        .iter()
        .copied()
        .chain(std::iter::once((Metric::QueueDepth, depth)))
        .collect();
    let writes: Vec<Write> = names
        .iter()
        .map(|(m, v)| Write {
            metric: m.name(),
            value: *v,
            peak: m.is_peak(),
        })
        .collect();
    let result = rollups::add(db, now_ms() / 60_000, replica, &writes).await;
    if result.is_err() {
        for (m, v) in taken {
            answers.tally.add(m, v as u64);
        }
    }
    result
}

/// Per point: each metric's value (counters added up over the point's minutes, the queue depth
/// its highest minute).
type Points = Vec<HashMap<String, f64>>;

async fn points(db: &Db, range: Range) -> DbResult<(Points, i64)> {
    let (n, width) = range.shape();
    let now = now_ms() / 60_000;
    let first = (now / width - (n - 1)) * width;
    let mut out: Points = vec![HashMap::new(); n as usize];
    for (minute, metric, value) in rollups::series(db, first).await? {
        let i = ((minute - first) / width) as usize;
        let Some(p) = out.get_mut(i) else { continue };
        let peak = Metric::from_name(&metric).is_some_and(Metric::is_peak);
        let v = p.entry(metric).or_insert(0.0);
        *v = match peak {
            true => v.max(value),
            false => *v + value,
        };
    }
    let since_ms = first * 60_000;
    for (t, kind, count) in rollups::activity(db, since_ms, width * 60_000).await? {
        let i = ((t / 60_000 - first) / width) as usize;
        if let Some(p) = out.get_mut(i) {
            *p.entry(kind).or_insert(0.0) += count as f64;
        }
    }
    Ok((out, width))
}

fn line(points: &Points, metric: &str) -> Vec<f64> {
    points
        .iter()
        .map(|p| p.get(metric).copied().unwrap_or(0.0))
        .collect()
}

/// The time to first token below which `q` of the answers of a point came (the bucket's upper
/// bound; 0 for a point without answers).
fn first_token_quantile(p: &HashMap<String, f64>, q: f64) -> f64 {
    let counts: Vec<f64> = (0..=FIRST_TOKEN_BOUNDS.len())
        .map(|i| p.get(Metric::FirstToken(i).name()).copied().unwrap_or(0.0))
        .collect();
    let total: f64 = counts.iter().sum();
    if total == 0.0 {
        return 0.0;
    }
    let mut seen = 0.0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= q * total {
            return FIRST_TOKEN_BOUNDS.get(i).copied().unwrap_or(30.0);
        }
    }
    30.0
}

/// The dashboard's charts over `range`.
pub async fn charts(db: &Db, range: Range) -> DbResult<Vec<Chart>> {
    let (p, width) = points(db, range).await?;
    let per_second =
        |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| x / (width as f64 * 60.0)).collect() };
    let wait: Vec<f64> = p
        .iter()
        .map(|m| {
            let n = m.get("waits").copied().unwrap_or(0.0);
            match n > 0.0 {
                true => m.get("wait_ms").copied().unwrap_or(0.0) / n / 1000.0,
                false => 0.0,
            }
        })
        .collect();
    let p50: Vec<f64> = p.iter().map(|m| first_token_quantile(m, 0.5)).collect();
    let p95: Vec<f64> = p.iter().map(|m| first_token_quantile(m, 0.95)).collect();
    let outcomes: Vec<(&str, &str, Vec<f64>)> = [
        ("answered", "#2f7d57"),
        ("refused", "#8a6d00"),
        ("rate_limited", "#6b5bb5"),
        ("busy", "#b56b00"),
        ("overloaded", "#b3261e"),
        ("over_quota", "#555555"),
    ]
    .into_iter()
    .map(|(m, c)| (m, c, line(&p, m)))
    .collect();
    let total = |lines: &[(&str, &str, Vec<f64>)]| -> f64 {
        lines.iter().map(|(_, _, v)| v.iter().sum::<f64>()).sum()
    };
    let peak = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let make = |id, title_en, title_zh, lines: Vec<(&str, &str, Vec<f64>)>, summary| Chart {
        id,
        title_en,
        title_zh,
        svg: svg::lines(title_en, &lines),
        summary,
    };
    let tokens = per_second(line(&p, "tokens"));
    let depth = line(&p, "queue_depth");
    let active = line(&p, "active_users");
    let waitlist = vec![
        ("joined", "#2f7d57", line(&p, "joined")),
        ("admitted", "#6b5bb5", line(&p, "admitted")),
    ];
    let ratings = line(&p, "ratings");
    Ok(vec![
        make(
            "requests",
            "Requests by outcome",
            "请求结果",
            outcomes.clone(),
            total(&outcomes),
        ),
        make(
            "tokens",
            "Tokens per second",
            "每秒生成词元",
            vec![("tokens/s", "#2f7d57", tokens.clone())],
            peak(&tokens),
        ),
        make(
            "first_token",
            "Time to first token (s)",
            "首个词元用时（秒）",
            vec![("p50", "#2f7d57", p50), ("p95", "#b3261e", p95.clone())],
            peak(&p95),
        ),
        make(
            "queue",
            "Queue: deepest line, mean wait (s)",
            "排队：最长队列、平均等待（秒）",
            vec![
                ("depth", "#6b5bb5", depth.clone()),
                ("wait", "#b56b00", wait),
            ],
            peak(&depth),
        ),
        make(
            "active",
            "People asking",
            "提问的用户",
            vec![("users", "#2f7d57", active.clone())],
            peak(&active),
        ),
        make(
            "waitlist",
            "Waitlist: joins and admissions",
            "候补：加入与放行",
            waitlist.clone(),
            total(&waitlist),
        ),
        make(
            "ratings",
            "Ratings",
            "评分",
            vec![("ratings", "#8a6d00", ratings.clone())],
            ratings.iter().sum(),
        ),
    ])
}
