//! `moss bench --schema`: the same run with every stream held to a JSON schema, next to without.

use super::measure::{measure, BenchReport, Workload};
use super::BenchArgs;
use crate::engine::{Constraint, EngineHandle, Grammar};

/// The schema `--schema` holds streams to: records with open strings, so the answer does not
/// end before `--gen-tokens`.
fn bench_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "kind": {"enum": ["fruit", "tool", "city"]},
                "count": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["name", "kind", "count", "tags"],
            "additionalProperties": false
        }
    })
}

/// The same run with every stream held to `bench_schema`, alternating with runs without (the
/// first one without is `plain`), and the ratio of the two.
pub(super) fn compare_schema(
    engine: &EngineHandle,
    args: &BenchArgs,
    work: &Workload,
    plain: BenchReport,
) -> anyhow::Result<()> {
    let constraint = engine
        .info
        .vocabulary
        .constraint(&Grammar::JsonSchema(bench_schema()))
        .map_err(|e| anyhow::anyhow!(e))?;
    let run = |constraint: Option<Constraint>| {
        measure(
            engine,
            &Workload {
                constraint,
                ..work.clone()
            },
        )
    };
    // (held to the schema, report)
    let mut rows = vec![(false, plain), (true, run(Some(constraint.clone()))?)];
    rows.push((false, run(None)?));
    rows.push((true, run(Some(constraint))?));
    let label = |schema: bool| if schema { "schema" } else { "without" };
    if args.json {
        let reports: Vec<_> = rows
            .iter()
            .map(|(k, r)| serde_json::json!({"run": label(*k), "report": r}))
            .collect();
        println!("{}", serde_json::to_string(&reports)?);
        return Ok(());
    }
    println!(
        "model {} on {}; prompt {} / gen {} tokens, {} stream(s)",
        engine.info.name, engine.info.device, args.prompt_tokens, args.gen_tokens, args.concurrency
    );
    println!("run        decode tok/s   aggregate tok/s");
    for (schema, r) in &rows {
        let kind = label(*schema);
        println!(
            "{kind:<10} {:>12.1} {:>17.1}",
            r.decode_tok_s, r.aggregate_tok_s
        );
    }
    let mean = |schema: bool, f: fn(&BenchReport) -> f64| {
        let v: Vec<f64> = rows
            .iter()
            .filter(|(s, _)| *s == schema)
            .map(|(_, r)| f(r))
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "schema / without: decode {:.2}x, aggregate {:.2}x",
        mean(true, |r| r.decode_tok_s) / mean(false, |r| r.decode_tok_s),
        mean(true, |r| r.aggregate_tok_s) / mean(false, |r| r.aggregate_tok_s)
    );
    Ok(())
}
