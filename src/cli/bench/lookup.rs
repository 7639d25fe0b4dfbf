//! `moss bench --lookup`: prompt-lookup drafting on answers that copy from the conversation (a
//! code file to fix, a passage to correct) and on plain chat questions, each run with and without
//! drafting, alternating; the answers must come out the same.

use std::sync::atomic::Ordering;

use super::measure::{run_streams, summarise, BenchReport, Workload};
use crate::engine::{ChatMessage, EngineHandle, GenerateRequest, Role, SamplingParams};

/// Answers that repeat most of their prompt.
const COPY_TASKS: [&str; 2] = [
    "Fix the bug in this Python module and reply with the whole corrected file, nothing else.\n\n```python\nimport json\nfrom dataclasses import dataclass, field\n\n\n@dataclass\nclass Order:\n    id: int\n    customer: str\n    items: list = field(default_factory=list)\n\n    def total(self):\n        total = 0\n        for item in self.items:\n            total += item[\"price\"] * item[\"quantity\"]\n        return total\n\n    def add(self, name, price, quantity=1):\n        self.items.append({\"name\": name, \"price\": price, \"quantity\": quantity})\n\n    def remove(self, name):\n        self.items = [i for i in self.items if i[\"name\"] == name]\n\n    def to_json(self):\n        return json.dumps({\"id\": self.id, \"customer\": self.customer, \"items\": self.items})\n\n\ndef load_orders(path):\n    with open(path) as f:\n        return [Order(**o) for o in json.load(f)]\n```",
    "Correct the spelling and grammar mistakes in this passage and reply with the corrected passage only.\n\nThe library opened it's doors in 1901, when the town had fewer then three thousand residents. For decades it occupied a single room above the post office, and the librarian, who was also the postmaster, kept the books in a locked cabinet that only he could open. In 1934 a group of residents raised enough money to by the old school building, and the collection were moved there the following spring. Today the library holds more then forty thousand books, a small museum of local history, and a reading room that is open every day of the week exept Sunday.",
];

/// Ordinary questions: little of the answer is in the prompt.
const CHAT_TASKS: [&str; 4] = [
    "Please tell me about how bridges carry load, in a few sentences, for a curious student.",
    "Why is the sky blue? Explain it simply.",
    "What does a compiler do? Give a short overview.",
    "How do bees make honey?",
];

/// The two workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Copy,
    Chat,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Copy => "copy",
            Kind::Chat => "chat",
        }
    }

    fn tasks(self) -> &'static [&'static str] {
        match self {
            Kind::Copy => &COPY_TASKS,
            Kind::Chat => &CHAT_TASKS,
        }
    }
}

pub(super) fn compare_lookup(
    engine: &EngineHandle,
    system: &str,
    work: &Workload,
    json: bool,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for kind in [Kind::Copy, Kind::Chat] {
        let prompts = kind
            .tasks()
            .iter()
            .map(|t| {
                let history = [ChatMessage::new(Role::User, t.to_string())];
                Ok(engine.prompt(Some(system), &history, work.gen)?.ids)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Unmeasured: leaves each prompt in the prefix cache, so that every measured run starts
        // from the same cache (a prompt computed afresh and one continued from the cache round
        // differently, which can tip a greedy near-tie either way).
        run(engine, &prompts, work, false)?;
        let mut first: Option<Vec<String>> = None;
        // Without, with, without, with: both see the machine in the same state on average.
        for lookup in [false, true, false, true] {
            let (report, drafted, accepted, answers) = run(engine, &prompts, work, lookup)?;
            // The answers with drafting must be those without (greedy decoding).
            let same = first.get_or_insert_with(|| answers.clone()) == &answers;
            rows.push(Row {
                kind,
                lookup,
                report,
                drafted,
                accepted,
                same,
            });
        }
    }
    let identical = rows.iter().all(|r| r.same);
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "workload": r.kind.name(), "lookup": r.lookup, "report": r.report,
                    "drafted": r.drafted, "accepted": r.accepted,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"runs": out, "identical_answers": identical})
        );
    } else {
        print(engine, work, &rows, identical);
    }
    anyhow::ensure!(
        identical,
        "answers with prompt lookup differ from those without"
    );
    Ok(())
}

struct Row {
    kind: Kind,
    lookup: bool,
    report: BenchReport,
    drafted: u64,
    accepted: u64,
    /// The same answers as the first run of its kind.
    same: bool,
}

/// One run of `work.concurrency` streams over `prompts` (in turn); the report, tokens drafted and
/// accepted, and the answers.
fn run(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    work: &Workload,
    lookup: bool,
) -> anyhow::Result<(BenchReport, u64, u64, Vec<String>)> {
    let requests = (0..work.concurrency.max(1))
        .map(|i| GenerateRequest {
            prompt: prompts[i % prompts.len()].clone(),
            sampling: SamplingParams::greedy(),
            max_tokens: work.gen,
            no_lookup: !lookup,
            ..Default::default()
        })
        .collect();
    let stats = &engine.stats;
    let before = (
        stats.draft_tokens.load(Ordering::Relaxed),
        stats.draft_accepted.load(Ordering::Relaxed),
        stats.prefix_tokens_reused.load(Ordering::Relaxed),
    );
    let (streams, wall) = run_streams(engine, requests)?;
    let drafted = stats.draft_tokens.load(Ordering::Relaxed) - before.0;
    let accepted = stats.draft_accepted.load(Ordering::Relaxed) - before.1;
    // Prompt tokens per stream that came from the prefix cache (each run after the first).
    let reused = (stats.prefix_tokens_reused.load(Ordering::Relaxed) - before.2) as f64
        / streams.len().max(1) as f64;
    let answers = streams.iter().map(|s| s.text.clone()).collect();
    let work = Workload {
        prompt: prompts.iter().map(Vec::len).sum::<usize>() / prompts.len().max(1),
        ..work.clone()
    };
    let report = summarise(engine, &work, &streams, wall, reused);
    Ok((report, drafted, accepted, answers))
}

fn print(engine: &EngineHandle, work: &Workload, rows: &[Row], identical: bool) {
    println!(
        "model {} on {}; up to {} tokens per answer, {} stream(s)",
        engine.info.name, engine.info.device, work.gen, work.concurrency
    );
    println!("workload  lookup  decode tok/s  aggregate tok/s  drafted  accepted  same answers");
    for r in rows {
        println!(
            "{:<9} {:<7} {:>12.1} {:>16.1} {:>8} {:>9}  {}",
            r.kind.name(),
            if r.lookup { "on" } else { "off" },
            r.report.decode_tok_s,
            r.report.aggregate_tok_s,
            r.drafted,
            r.accepted,
            if r.same { "yes" } else { "NO" }
        );
    }
    for kind in [Kind::Copy, Kind::Chat] {
        let mean = |lookup: bool, f: fn(&BenchReport) -> f64| {
            let v: Vec<f64> = rows
                .iter()
                .filter(|r| r.kind == kind && r.lookup == lookup)
                .map(|r| f(&r.report))
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let (drafted, accepted) = rows
            .iter()
            .filter(|r| r.kind == kind && r.lookup)
            .fold((0, 0), |(d, a), r| (d + r.drafted, a + r.accepted));
        println!(
            "{}: with / without lookup: decode {:.2}x, aggregate {:.2}x; {:.0} % of drafted tokens accepted",
            kind.name(),
            mean(true, |r| r.decode_tok_s) / mean(false, |r| r.decode_tok_s),
            mean(true, |r| r.aggregate_tok_s) / mean(false, |r| r.aggregate_tok_s),
            100.0 * accepted as f64 / drafted.max(1) as f64
        );
    }
    println!(
        "answers identical with and without: {}",
        if identical { "yes" } else { "NO" }
    );
}
