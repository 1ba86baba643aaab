//! The `serve` workload: `peft serve`'s server (in this process, on a loopback port) over a
//! random-weight model of the bench's shape, with adapters of every method, under
//! the load generator. Three runs of the same requests (same prompts, same lengths, greedy):
//!
//! - **mixed**: each request names its adapter, the adapters in turn; rows of all of them share
//!   the batch;
//! - **base**: every request served by the bare base, at the same batch size;
//! - **by adapter**: one adapter's requests at a time, the next adapter's only once they are all
//!   answered, as a PEFT user serves them with `set_adapter` (PEFT cannot mix prompt-learning
//!   adapters in a batch).
//!
//! A response is lost when it is not a 200, and wrong when its token count is not `max_tokens`
//! (no EOS: every request runs to its length) or its text differs from the same request's in the
//! by-adapter run. The tokenizer maps every id to its own word, so equal texts are equal tokens.

use std::path::Path;
use std::time::Duration;

use burn::prelude::*;
use burn::tensor::DType;
use peft::core::params::cast_params;
use peft::core::{Adapter, BaseShape};
use peft::models::{AutoConfig, Tokenizer};
use peft_serve::http::{ServeOptions, Server};
use serde_json::{Value, json};

use crate::bench::{BenchMethod, bench_methods};
use crate::load::{self, LoadRun};

/// What the serve workload runs.
pub struct ServeSettings<'a> {
    /// The model shape (random weights).
    pub config: &'a Path,
    /// The base's dtype.
    pub dtype: DType,
    /// Adapters, the prompt-learning methods in turn.
    pub adapters: usize,
    /// Virtual tokens (or prefix positions) of the adapters: they vary from half this to 1.5x.
    pub num_virtual_tokens: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests per run.
    pub requests: usize,
    /// Rows decoded together.
    pub max_batch_size: usize,
    /// Prompt lengths, drawn per request in this range (inclusive).
    pub prompt_lengths: (usize, usize),
    /// `max_tokens` of every request.
    pub new_tokens: usize,
    /// No run sends requests or waits for answers past this.
    pub time_limit: Duration,
    /// Rounds of the three runs (at least 1); each run keeps its fastest.
    pub rounds: usize,
}

/// The figures of one run.
struct RunFigures {
    tokens_per_s: f64,
    p50_s: f64,
    p99_s: f64,
    wall_s: f64,
    lost: usize,
    wrong: usize,
}

impl RunFigures {
    fn json(&self) -> Value {
        json!({
            "tokens_per_s": self.tokens_per_s, "latency_p50_s": self.p50_s,
            "latency_p99_s": self.p99_s, "wall_s": self.wall_s, "lost": self.lost,
            "wrong": self.wrong,
        })
    }
}

/// The bench's cases with an adapter: every method (the server mixes them all).
fn served_methods() -> Vec<BenchMethod> {
    bench_methods()
        .into_iter()
        .filter(|m| m.preset.is_some())
        .collect()
}

/// A tokenizer with one word per id (`t0`, `t1`, ...): a random model's ids all decode, each to
/// its own word.
fn word_per_id_tokenizer(vocab_size: usize) -> Result<Tokenizer, String> {
    use tokenizers::models::wordlevel::WordLevel;
    let model = WordLevel::builder()
        .vocab(
            (0..vocab_size as u32)
                .map(|i| (format!("t{i}"), i))
                .collect(),
        )
        .unk_token("t0".into())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Tokenizer::new(model))
}

/// Deterministic prompts: lengths in `range`, ids below `vocab_size`.
fn prompts(count: usize, range: (usize, usize), vocab_size: usize) -> Vec<Vec<u32>> {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let len = range.0 + (next() as usize) % (range.1 - range.0 + 1);
            (0..len)
                .map(|_| (next() % vocab_size as u64) as u32)
                .collect()
        })
        .collect()
}

/// Runs the serve workload; returns its JSON record and whether any response was lost or wrong.
pub fn bench_serve(
    settings: &ServeSettings<'_>,
    device: &Device,
) -> Result<(Value, usize), String> {
    let s = settings;
    if s.adapters == 0
        || s.clients == 0
        || s.requests == 0
        || s.max_batch_size == 0
        || s.rounds == 0
    {
        return Err(
            "--serve-adapters, --clients, --requests and --serve-batch must be >= 1".into(),
        );
    }
    if s.prompt_lengths.0 == 0 || s.prompt_lengths.0 > s.prompt_lengths.1 {
        return Err("--prompt-lengths: MIN-MAX with 1 <= MIN <= MAX".into());
    }
    let config = AutoConfig::from_file(s.config).map_err(|e| e.to_string())?;
    let geometry = config.geometry();
    device.seed(0);
    let base = cast_params(config.init(device), s.dtype);
    let shape = BaseShape::of(&base);

    // The adapters, written as PEFT's inference files: the server reads them as a user's.
    let dir = std::env::temp_dir().join(format!("peft-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let methods = served_methods();
    let mut names = Vec::with_capacity(s.adapters);
    for i in 0..s.adapters {
        let method = methods[i % methods.len()];
        let tokens = (s.num_virtual_tokens / 2 + (i * 7) % s.num_virtual_tokens.max(1)).max(1);
        let config = crate::bench::adapter_config(method, tokens, &geometry)
            .expect("served methods have a preset");
        let name = format!("{i:02}-{}-{tokens}", method.name());
        let adapter = crate::bench::init_adapter(&config, &base);
        // An adapter that trains the base's weights holds none of its own until trained: it is
        // saved with the model's (its bias deltas are then zeros, which cost what any deltas cost).
        let written = if adapter.changes_base_weights() {
            adapter.save(&dir.join(&name), &base, None)
        } else {
            adapter
                .into_inference()
                .write(&dir.join(&name), &shape, None)
        };
        written.map_err(|e| format!("writing adapter {name}: {e}"))?;
        names.push(name);
    }
    let tokenizer = word_per_id_tokenizer(geometry.vocab_size)?;
    let options = ServeOptions {
        adapters: Some(dir.clone()),
        max_batch_size: s.max_batch_size,
        max_queue: s.requests.max(s.clients) + 1,
        max_loaded_adapters: s.adapters,
        ..ServeOptions::default()
    };
    let server = Server::new(base, tokenizer, Vec::new(), None, "base".into(), &options)
        .spawn("127.0.0.1:0".parse().expect("an address"))
        .map_err(|e| format!("starting the server: {e}"))?;
    let url = server.url();

    let prompts = prompts(s.requests, s.prompt_lengths, geometry.vocab_size);
    let body = |model: &str, prompt: &[u32], max_tokens: usize| {
        json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            .to_string()
    };
    let adapter_of = |i: usize| &names[i % names.len()];
    let run = |bodies: &[String], clients: usize| {
        load::run(&url, "/v1/completions", bodies, clients, s.time_limit, None)
    };

    // Warm-up (not timed): every adapter read once, the allocator's pools filled.
    let warm: Vec<String> = (0..names.len().max(s.max_batch_size))
        .map(|i| body(adapter_of(i), &prompts[i % prompts.len()], 2))
        .collect();
    let warmed = run(&warm, s.clients);
    if warmed.lost() > 0 {
        return Err(format!(
            "warm-up: {} of {} requests failed",
            warmed.lost(),
            warm.len()
        ));
    }

    let mixed_bodies: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| body(adapter_of(i), p, s.new_tokens))
        .collect();
    let base_bodies: Vec<String> = prompts
        .iter()
        .map(|p| body("base", p, s.new_tokens))
        .collect();
    // One adapter's requests at a time, in full batches of its own.
    let by_adapter_run = || {
        let mut all = LoadRun {
            wall_s: 0.0,
            answers: vec![None; prompts.len()],
        };
        for a in 0..names.len() {
            let index: Vec<usize> = (a..prompts.len()).step_by(names.len()).collect();
            let bodies: Vec<String> = index.iter().map(|&i| mixed_bodies[i].clone()).collect();
            let part = run(&bodies, s.clients);
            all.wall_s += part.wall_s;
            for (&i, answer) in index.iter().zip(part.answers) {
                all.answers[i] = answer;
            }
        }
        all
    };
    // Rounds rotate the order of the three runs (a shared machine drifts, and a run warms the
    // allocator for the next); each run keeps its fastest round.
    let mut best: [Option<LoadRun>; 3] = [None, None, None];
    for round in 0..s.rounds {
        for k in 0..3 {
            let which = (round + k) % 3;
            let result = match which {
                0 => run(&mixed_bodies, s.clients),
                1 => run(&base_bodies, s.clients),
                _ => by_adapter_run(),
            };
            if best[which]
                .as_ref()
                .is_none_or(|b| result.wall_s < b.wall_s)
            {
                best[which] = Some(result);
            }
        }
    }
    let [Some(mixed), Some(bare), Some(by_adapter)] = best else {
        unreachable!("at least one round ran every run");
    };
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);

    let wrong_length = |run: &LoadRun| {
        run.answers
            .iter()
            .flatten()
            .filter(|a| a.status == 200 && a.completion_tokens != s.new_tokens as u64)
            .count()
    };
    let differing = mixed
        .answers
        .iter()
        .zip(&by_adapter.answers)
        .filter(|(m, b)| match (m, b) {
            (Some(m), Some(b)) if m.status == 200 && b.status == 200 => m.text != b.text,
            _ => false,
        })
        .count();
    let figures = |run: &LoadRun, wrong: usize| {
        let latencies = run.latencies();
        RunFigures {
            tokens_per_s: run.tokens() as f64 / run.wall_s.max(1e-9),
            p50_s: load::quantile(&latencies, 0.5),
            p99_s: load::quantile(&latencies, 0.99),
            wall_s: run.wall_s,
            lost: run.lost(),
            wrong,
        }
    };
    let runs = [
        ("mixed", figures(&mixed, wrong_length(&mixed) + differing)),
        ("base", figures(&bare, wrong_length(&bare))),
        (
            "by-adapter",
            figures(&by_adapter, wrong_length(&by_adapter)),
        ),
    ];
    let mixed_vs_base = runs[0].1.tokens_per_s / runs[1].1.tokens_per_s.max(1e-9);
    let mixed_vs_by_adapter = runs[0].1.tokens_per_s / runs[2].1.tokens_per_s.max(1e-9);
    let mut counts: Vec<String> = Vec::new();
    for m in &methods {
        let n = (0..s.adapters)
            .filter(|i| methods[i % methods.len()].name() == m.name())
            .count();
        counts.push(format!("{} x{n}", m.name()));
    }
    println!(
        "\nserve: {} adapters ({}), {} requests of {}-{} prompt tokens + {} new, {} clients, batch {}",
        s.adapters,
        counts.join(", "),
        s.requests,
        s.prompt_lengths.0,
        s.prompt_lengths.1,
        s.new_tokens,
        s.clients,
        s.max_batch_size
    );
    println!(
        "{:<11} {:>10} {:>9} {:>9} {:>8} {:>5} {:>6}",
        "run", "tokens/s", "p50 s", "p99 s", "wall s", "lost", "wrong"
    );
    for (name, f) in &runs {
        println!(
            "{name:<11} {:>10.1} {:>9.3} {:>9.3} {:>8.1} {:>5} {:>6}",
            f.tokens_per_s, f.p50_s, f.p99_s, f.wall_s, f.lost, f.wrong
        );
    }
    println!(
        "mixed / base throughput {mixed_vs_base:.2}x (target >= 0.9); mixed / by-adapter {mixed_vs_by_adapter:.2}x (target >= 3)"
    );
    let bad: usize = runs.iter().map(|(_, f)| f.lost + f.wrong).sum();
    let record = json!({
        "adapters": names,
        "requests": s.requests,
        "clients": s.clients,
        "max_batch_size": s.max_batch_size,
        "prompt_lengths": [s.prompt_lengths.0, s.prompt_lengths.1],
        "new_tokens": s.new_tokens,
        "rounds": s.rounds,
        "mixed": runs[0].1.json(),
        "base": runs[1].1.json(),
        "by_adapter": runs[2].1.json(),
        "mixed_vs_base": mixed_vs_base,
        "mixed_vs_by_adapter": mixed_vs_by_adapter,
    });
    Ok((record, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole workload on a tiny model: every response arrives, and every mixed response
    /// equals the same request served with its adapter alone in the batch.
    #[test]
    fn the_serve_workload_loses_nothing_and_mixed_answers_equal_by_adapter_ones() {
        let config = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/models/qwen2-gqa-tied/config.json");
        let (record, bad) = bench_serve(
            &ServeSettings {
                config: &config,
                dtype: DType::F32,
                adapters: 6,
                num_virtual_tokens: 6,
                clients: 12,
                requests: 24,
                max_batch_size: 12,
                prompt_lengths: (3, 20),
                new_tokens: 6,
                time_limit: Duration::from_secs(120),
                rounds: 1,
            },
            &Device::default(),
        )
        .unwrap();
        assert_eq!(bad, 0, "{record}");
        for run in ["mixed", "base", "by_adapter"] {
            assert_eq!(record[run]["lost"], 0, "{record}");
            assert!(
                record[run]["tokens_per_s"].as_f64().unwrap() > 0.0,
                "{record}"
            );
        }
        assert_eq!(record["adapters"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn every_id_decodes_to_its_own_word() {
        let tokenizer = word_per_id_tokenizer(100).unwrap();
        assert_eq!(tokenizer.decode(&[5, 99, 0], true).unwrap(), "t5 t99 t0");
    }
}
