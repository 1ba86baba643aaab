//! `cargo xtask gpu-check`: everything a lent GPU should be asked, in one call.
//!
//! On the compiled backend's default device (CUDA in a `--features cuda,flex` build; Flex or
//! CubeCL's CPU runtime in a dry run here), against the committed fixtures:
//! 1. model parity with transformers: every fixture model in f32 (logits within 1e-4) and in bf16
//!    (mean error within 2% of the mean logit, the CPU tests' bound);
//! 2. every method's PEFT parity: logits (1e-4), loss (1e-5), one SGD step (1e-5);
//! 3. greedy generation with each fixture adapter, token-identical to PEFT's;
//! 4. 20 training steps of every method, each step's loss against the same steps on Flex in the
//!    same process (needs the `flex` feature beside the device's);
//! 5. `bench --compare` on the Qwen2.5-0.5B shape (bf16 base, f32 adapters, batch 8 x 512) with the
//!    torch + transformers + peft side when the machine has them (`--quick`: a small shape).
//!
//! Every check runs, whatever failed before it (a panic is caught and recorded as a failure);
//! the results go to `OUT/gpu-check.json` and `OUT/gpu-check.md` (a table), `OUT` being `--out`,
//! else `$OUT` (the device tool's folder), else `gpu-check/`, rewritten after every check, so that
//! a call cut off at the device's time limit still brings back what ran. With `--budget-s` no check
//! starts once that many seconds have passed: each is recorded as skipped, and `--sections` runs
//! the rest in a second call. The exit status is 2 when a check failed, 3 when one was left out
//! for the budget. docs/gpu.md says how to build, carry and run it.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::DType;
use clap::Parser;
use peft::core::adapter_file::write_atomic;
use peft::core::{CausalLm, GenerationConfig, PeftModel};
use peft::models::{AutoCausalLm, load_tokenizer};
use peft::train::data::{
    DataOptions, Dataset, TokenizeOptions, TokenizedDataset, TokenizedExample, TokenizerEncoder,
};
use peft::train::trainer::{
    GradientSync, METRICS_FILE, MetricsLine, StepMetrics, TrainingConfig, TrainingObserver,
    TrainingRun, read_metrics, train,
};
use peft::{AutoAdapter, AutoAdapterConfig};
use serde_json::{Value, json};

/// Arguments of `cargo xtask gpu-check`.
#[derive(Debug, clap::Args)]
pub struct GpuCheckArgs {
    /// Where the JSON and the table go (default: `$OUT`, else `gpu-check/`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The repository's `fixtures/` (default: `fixtures` under the current directory).
    #[arg(long, default_value = "fixtures")]
    fixtures: PathBuf,
    /// Training steps per method compared with Flex.
    #[arg(long, default_value_t = 20)]
    train_steps: usize,
    /// Bench on a small shape (2 layers, batch 2 x 64) instead of Qwen2.5-0.5B's: a dry run's
    /// setting.
    #[arg(long)]
    quick: bool,
    /// Leave the bench out.
    #[arg(long)]
    skip_bench: bool,
    /// Python with torch, transformers and peft for the bench's comparison (default: the first
    /// of /work/venv/bin/python, .venv/bin/python and python3 that imports them); without one
    /// the bench runs our side only.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Bench our side only, even where torch is installed.
    #[arg(long)]
    no_compare: bool,
    /// Seconds after which no further check starts (each is recorded as skipped): a device call
    /// has a hard limit, and a check cut off there would take the ones after it along.
    #[arg(long)]
    budget_s: Option<f64>,
    /// Sections to run, comma separated (default: all, in this order). `adapter` includes the
    /// greedy generation with each adapter.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Section::all())]
    sections: Vec<Section>,
    /// The bench's methods, comma separated, each benched in turn (its own case, so that the
    /// budget can stop between them): by default the base and the two methods of the GPU
    /// targets (docs/gpu.md); `bench --methods` takes the same names.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "base,prompt-tuning,prefix-tuning"
    )]
    bench_methods: Vec<String>,
    /// Only the cases whose name contains this (`qwen2-bf16`, `bloom-6-heads/p-tuning-v2`,
    /// `prefix-tuning`): to rerun what failed.
    #[arg(long)]
    cases: Option<String>,
}

/// A part of the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Every fixture model against transformers (f32, and bf16 where bounded).
    Model,
    /// Every (model, method) PEFT fixture: logits, loss, one SGD step, greedy generation.
    Adapter,
    /// Every method's training steps against Flex's.
    Train,
    /// Two devices against one accumulating (skipped on a one-device machine).
    DataParallel,
    /// `bench --compare` on the Qwen2.5-0.5B shape.
    Bench,
}

impl Section {
    fn all() -> Vec<Self> {
        vec![
            Self::Model,
            Self::Adapter,
            Self::Train,
            Self::DataParallel,
            Self::Bench,
        ]
    }
}

#[cfg(test)]
impl GpuCheckArgs {
    fn try_parse_from_for_test(args: &[&str]) -> Self {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: GpuCheckArgs,
        }
        Wrap::try_parse_from(std::iter::once("gpu-check").chain(args.iter().copied()))
            .unwrap()
            .args
    }
}

/// One measured check.
struct Record {
    section: &'static str,
    case: String,
    metric: &'static str,
    value: f64,
    bound: f64,
    ok: bool,
    /// Left out, not measured: for the time budget, or for want of a second device.
    skipped: Option<Skip>,
    note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// `--budget-s` was spent before the check could start.
    Budget,
    /// The machine lacks what the check needs (a second device).
    Hardware,
}

/// The records so far, and where they are written after every check.
struct Checks {
    records: Vec<Record>,
    /// The bench's results, one entry per benched method.
    bench: Vec<Value>,
    started: Instant,
    budget: Option<Duration>,
    /// `--cases`: only cases whose name contains it run.
    cases: Option<String>,
    out: PathBuf,
    /// Training runs' folders and the bench's JSON, outside `out`: the device tool brings back
    /// eight files of `$OUT`, and a run cut off there would leave its files in it.
    scratch: PathBuf,
    device: String,
}

/// What a finished check reports: failures make the exit status 2, checks left out for the
/// budget 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub failed: usize,
    /// Checks not run, for any reason.
    pub skipped: usize,
    pub skipped_for_budget: usize,
}

impl Checks {
    /// Records `value` against `bound` (ok when `value <= bound`).
    fn within(
        &mut self,
        section: &'static str,
        case: &str,
        metric: &'static str,
        value: f64,
        bound: f64,
    ) {
        let ok = value.is_finite() && value <= bound;
        eprintln!(
            "{} {section} {case}: {metric} {value:.3e} (bound {bound:.1e})",
            if ok { "ok  " } else { "FAIL" }
        );
        self.records.push(Record {
            section,
            case: case.to_string(),
            metric,
            value,
            bound,
            ok,
            skipped: None,
            note: String::new(),
        });
    }

    /// Records `case` of `section` as not run.
    fn skip(&mut self, section: &'static str, case: &str, why: Skip, note: String) {
        eprintln!("skip {section} {case}: {note}");
        self.records.push(Record {
            section,
            case: case.to_string(),
            metric: "skipped",
            value: f64::NAN,
            bound: f64::NAN,
            ok: true,
            skipped: Some(why),
            note,
        });
    }

    /// Whether `--budget-s` is spent.
    fn out_of_time(&self) -> bool {
        self.budget.is_some_and(|b| self.started.elapsed() >= b)
    }

    /// Runs `check`, recording a panic or an error as a failure of `section`/`case`; once the
    /// budget is spent it records `case` as skipped instead. The results are written after it
    /// either way.
    fn guard(
        &mut self,
        section: &'static str,
        case: &str,
        check: impl FnOnce(&mut Self) -> Result<(), String>,
    ) {
        if self.cases.as_ref().is_some_and(|only| !case.contains(only)) {
            return;
        }
        if self.out_of_time() {
            let note = format!(
                "the time budget ({:.0} s) was spent at {:.0} s",
                self.budget.unwrap_or_default().as_secs_f64(),
                self.started.elapsed().as_secs_f64()
            );
            self.skip(section, case, Skip::Budget, note);
            self.save_or_warn();
            return;
        }
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| check(self)));
        eprintln!(
            "     {section} {case}: {:.1} s (at {:.0} s)",
            started.elapsed().as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        );
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(panic) => Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
            ),
        };
        if let Some(failure) = failure {
            eprintln!("FAIL {section} {case}: {failure}");
            self.records.push(Record {
                section,
                case: case.to_string(),
                metric: "error",
                value: f64::NAN,
                bound: f64::NAN,
                ok: false,
                skipped: None,
                note: failure,
            });
        }
        self.save_or_warn();
    }

    fn summary(&self) -> Summary {
        Summary {
            failed: self.records.iter().filter(|r| !r.ok).count(),
            skipped: self.records.iter().filter(|r| r.skipped.is_some()).count(),
            skipped_for_budget: self
                .records
                .iter()
                .filter(|r| r.skipped == Some(Skip::Budget))
                .count(),
        }
    }

    /// Writes the results so far (an intermediate write that fails is reported, not fatal: the
    /// final one is).
    fn save_or_warn(&self) {
        if let Err(e) = self.save(false) {
            eprintln!("warning: {e}");
        }
    }

    /// Writes `gpu-check.json` and `gpu-check.md`, each through a temporary file renamed over
    /// the last one, so that a process killed mid-write leaves the previous complete file.
    fn save(&self, finished: bool) -> Result<(), String> {
        let Summary {
            failed,
            skipped,
            skipped_for_budget,
        } = self.summary();
        let seconds = self.started.elapsed().as_secs_f64();
        let json = json!({
            "backend": peft::backend_name(),
            "device": self.device,
            "finished": finished,
            "seconds": seconds,
            "budget_s": self.budget.map(|b| b.as_secs_f64()),
            "checks": self.records.len(),
            "failed": failed,
            "skipped": skipped,
            "skipped_for_budget": skipped_for_budget,
            "records": self.records.iter().map(|r| json!({
                "section": r.section, "case": r.case, "metric": r.metric,
                "value": if r.value.is_finite() { json!(r.value) } else { Value::Null },
                "bound": if r.bound.is_finite() { json!(r.bound) } else { Value::Null },
                "ok": r.ok,
                "skipped": r.skipped.map(|s| match s {
                    Skip::Budget => "time budget",
                    Skip::Hardware => "hardware",
                }),
                "note": r.note,
            })).collect::<Vec<_>>(),
            "bench": self.bench,
        });
        write_replacing(
            &self.out.join("gpu-check.json"),
            &serde_json::to_string_pretty(&json).expect("JSON of plain values"),
        )?;
        write_replacing(&self.out.join("gpu-check.md"), &self.table(finished))
    }

    /// A table per section with its worst value against its bound, then every failure and
    /// every check left out, then the bench's tables.
    fn table(&self, finished: bool) -> String {
        let Summary {
            failed, skipped, ..
        } = self.summary();
        let mut table = format!(
            "# gpu-check: {} ({}), {} checks, {failed} failed, {skipped} skipped, {:.0} s{}\n\n\
             | section | checks | failed | skipped | worst value / bound |\n|---|---:|---:|---:|---|\n",
            peft::backend_name(),
            self.device,
            self.records.len(),
            self.started.elapsed().as_secs_f64(),
            if finished { "" } else { " (still running)" },
        );
        let mut sections: Vec<&'static str> = Vec::new();
        for r in &self.records {
            if !sections.contains(&r.section) {
                sections.push(r.section);
            }
        }
        for section in sections {
            let rows: Vec<&Record> = self
                .records
                .iter()
                .filter(|r| r.section == section)
                .collect();
            let worst = rows
                .iter()
                .filter(|r| r.bound.is_finite() && r.bound > 0.0)
                .map(|r| (r.value / r.bound, r))
                .fold(None::<(f64, &Record)>, |best, (ratio, r)| match best {
                    Some((b, _)) if b >= ratio => best,
                    _ => Some((ratio, r)),
                });
            let worst = worst.map_or(String::from("-"), |(_, r)| {
                format!("{} {}: {:.2e} / {:.0e}", r.case, r.metric, r.value, r.bound)
            });
            table.push_str(&format!(
                "| {section} | {} | {} | {} | {worst} |\n",
                rows.len(),
                rows.iter().filter(|r| !r.ok).count(),
                rows.iter().filter(|r| r.skipped.is_some()).count(),
            ));
        }
        for r in self.records.iter().filter(|r| !r.ok) {
            table.push_str(&format!(
                "\nFAILED {} {} {}: {} {}",
                r.section, r.case, r.metric, r.value, r.note
            ));
        }
        for r in self.records.iter().filter(|r| r.skipped.is_some()) {
            table.push_str(&format!("\nSKIPPED {} {}: {}", r.section, r.case, r.note));
        }
        let benched: Vec<&str> = self
            .bench
            .iter()
            .filter_map(|b| b.get("table").and_then(Value::as_str))
            .collect();
        if !benched.is_empty() {
            table.push_str("\n\n## bench\n");
            for rows in benched {
                table.push('\n');
                table.push_str(rows);
            }
        }
        table.push('\n');
        table
    }
}

/// Writes `text` to `path` atomically (a reader, or a process killed mid-write, sees the old file
/// or the new one, never half of one).
fn write_replacing(path: &Path, text: &str) -> Result<(), String> {
    write_atomic(path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Named tensors of an expected-output file.
struct Expected(HashMap<String, (Vec<usize>, TensorData)>);

impl Expected {
    fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut out = HashMap::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::I64 => DType::I64,
                _ => continue,
            };
            let shape = view.shape().to_vec();
            let data = TensorData::from_bytes_vec(view.data().to_vec(), shape.clone(), dtype);
            out.insert(name, (shape, data));
        }
        Ok(Self(out))
    }

    fn get(&self, name: &str) -> Result<&(Vec<usize>, TensorData), String> {
        self.0
            .get(name)
            .ok_or_else(|| format!("no tensor {name:?}"))
    }

    fn floats(&self, name: &str) -> Result<Vec<f32>, String> {
        self.get(name)?
            .1
            .clone()
            .try_into_vec_as()
            .map_err(|e| format!("{name}: {e:?}"))
    }

    fn rows(&self, name: &str) -> Result<Vec<Vec<i64>>, String> {
        let (shape, data) = self.get(name)?;
        let flat: Vec<i64> = data
            .clone()
            .try_into_vec_as()
            .map_err(|e| format!("{e:?}"))?;
        Ok(flat.chunks(shape[1]).map(<[i64]>::to_vec).collect())
    }

    fn ints(&self, name: &str, device: &Device) -> Result<Tensor<2, Int>, String> {
        Ok(Tensor::from_data(self.get(name)?.1.clone(), device))
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec_as::<f32>()
        .expect("float tensor")
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

/// Runs the checks; `Err` only when the results cannot be written.
pub fn gpu_check(args: &GpuCheckArgs) -> Result<Summary, String> {
    let out = args
        .out
        .clone()
        .or_else(|| std::env::var_os("OUT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("gpu-check"));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let budget = match args.budget_s {
        Some(s) if !(s.is_finite() && s >= 0.0) => {
            return Err(format!(
                "--budget-s must be a number of seconds >= 0, not {s}"
            ));
        }
        s => s.map(Duration::from_secs_f64),
    };
    let known: Vec<&str> = crate::bench::bench_methods()
        .iter()
        .map(|m| m.name())
        .collect();
    if let Some(unknown) = args
        .bench_methods
        .iter()
        .find(|m| !known.contains(&m.as_str()))
    {
        return Err(format!(
            "--bench-methods: no method {unknown:?} (one of {})",
            known.join(", ")
        ));
    }
    let device = peft::default_device();
    eprintln!(
        "gpu-check on {} ({device:?}), fixtures {}, sections {:?}{}",
        peft::backend_name(),
        args.fixtures.display(),
        args.sections,
        budget.map_or(String::new(), |b| format!(
            ", budget {:.0} s",
            b.as_secs_f64()
        )),
    );
    let mut checks = Checks {
        records: Vec::new(),
        bench: Vec::new(),
        started: Instant::now(),
        budget,
        cases: args.cases.clone(),
        out,
        scratch: std::env::temp_dir().join(format!("gpu-check-{}", std::process::id())),
        device: format!("{device:?}"),
    };
    for section in &args.sections {
        match section {
            Section::Model => model_parity(&mut checks, &args.fixtures, &device),
            Section::Adapter => adapter_parity(&mut checks, &args.fixtures, &device),
            Section::Train => {
                training_against_flex(&mut checks, &args.fixtures, &device, args.train_steps)
            }
            Section::DataParallel => data_parallel(&mut checks, &args.fixtures),
            Section::Bench if args.skip_bench => {}
            Section::Bench => run_bench(&mut checks, args),
        }
    }
    let _ = std::fs::remove_dir_all(&checks.scratch);
    checks.save(true)?;
    println!("{}", checks.table(true));
    Ok(checks.summary())
}

/// Fixture models with transformers' expected outputs.
fn fixture_models(fixtures: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures.join("models"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| {
                    fixtures
                        .join(format!("expected/{name}.safetensors"))
                        .is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn model_parity(checks: &mut Checks, fixtures: &Path, device: &Device) {
    let models = fixture_models(fixtures);
    if models.is_empty() {
        checks.guard("model", "fixtures", |_| {
            Err(format!("no fixture models under {}", fixtures.display()))
        });
    }
    for name in models {
        checks.guard("model", &name, |checks| {
            let expected = Expected::read(&fixtures.join(format!("expected/{name}.safetensors")))?;
            let want = expected.floats("logits")?;
            // bf16 compute where the CPU tests bound it: the bf16 checkpoint.
            let dtypes: &[DType] = if name == "qwen2-bf16" {
                &[DType::F32, DType::BF16]
            } else {
                &[DType::F32]
            };
            for &dtype in dtypes {
                let model = AutoCausalLm::from_pretrained(
                    fixtures.join("models").join(&name),
                    device,
                    dtype,
                )
                .map_err(|e| e.to_string())?;
                let got = values(model.forward_ids(expected.ints("input_ids", device)?, None));
                if dtype == DType::F32 {
                    checks.within(
                        "model",
                        &name,
                        "f32 max |logits - transformers|",
                        max_diff(&got, &want),
                        1e-4,
                    );
                } else {
                    let n = want.len().max(1) as f64;
                    let scale = want.iter().map(|x| f64::from(x.abs())).sum::<f64>() / n;
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| f64::from((a - b).abs()))
                        .sum::<f64>()
                        / n;
                    checks.within(
                        "model",
                        &name,
                        "bf16 mean |error| / mean |logit|",
                        err / scale,
                        0.02,
                    );
                }
            }
            Ok(())
        });
    }
}

/// (model, method) pairs with PEFT fixtures: every `expected/adapters/M-A.safetensors` whose
/// adapter folder exists.
fn adapter_cases(fixtures: &Path) -> Vec<(String, String)> {
    let mut cases = Vec::new();
    let Ok(models) = std::fs::read_dir(fixtures.join("adapters")) else {
        return cases;
    };
    for model in models.filter_map(|e| e.ok()) {
        let model_name = model.file_name().to_string_lossy().into_owned();
        let Ok(methods) = std::fs::read_dir(model.path()) else {
            continue;
        };
        for method in methods.filter_map(|e| e.ok()) {
            let method_name = method.file_name().to_string_lossy().into_owned();
            if fixtures
                .join(format!(
                    "expected/adapters/{model_name}-{method_name}.safetensors"
                ))
                .is_file()
            {
                cases.push((model_name.clone(), method_name));
            }
        }
    }
    cases.sort();
    cases
}

fn load_peft(
    fixtures: &Path,
    model: &str,
    method: &str,
    device: &Device,
) -> Result<PeftModel<AutoCausalLm, AutoAdapter>, String> {
    let base =
        AutoCausalLm::from_pretrained(fixtures.join("models").join(model), device, DType::F32)
            .map_err(|e| e.to_string())?;
    PeftModel::from_pretrained(base, &fixtures.join("adapters").join(model).join(method))
        .map_err(|e| e.to_string())
}

/// The trainable tensors under the fixture's keys after its SGD step (`after_sgd.` + PEFT's
/// encoder names or BitFit's Hugging Face bias names; prompt tuning's trainable tensor is its
/// `prompt_embeddings`), and the encoder's output where the fixture has it too.
fn trainable_tensors(peft: &PeftModel<AutoCausalLm, AutoAdapter>) -> Vec<(String, TensorData)> {
    let after_sgd = |tensors: Vec<(String, TensorData)>| {
        tensors
            .into_iter()
            .map(|(name, data)| (format!("after_sgd.{name}"), data))
            .collect::<Vec<_>>()
    };
    let output = |prompt_embeddings: Tensor<2>| {
        (
            "prompt_embeddings_after_sgd".to_string(),
            prompt_embeddings.into_data(),
        )
    };
    match &peft.adapter {
        AutoAdapter::PTuning(a) => {
            let mut tensors = after_sgd(a.encoder_tensors().unwrap_or_default());
            tensors.push(output(a.prompt_embeddings()));
            tensors
        }
        AutoAdapter::PrefixTuning(a) => {
            let mut tensors = after_sgd(a.encoder_tensors().unwrap_or_else(|| {
                vec![(
                    "embedding.weight".into(),
                    a.embedding.weight.val().into_data(),
                )]
            }));
            tensors.push(output(a.prompt_embeddings()));
            tensors
        }
        AutoAdapter::BitFit(a) => after_sgd(a.biases(&peft.base)),
        AutoAdapter::PromptTuning(a) => vec![output(a.embedding.weight.val())],
    }
}

fn adapter_parity(checks: &mut Checks, fixtures: &Path, device: &Device) {
    let cases = adapter_cases(fixtures);
    if cases.is_empty() {
        checks.guard("adapter", "fixtures", |_| {
            Err(format!("no adapter fixtures under {}", fixtures.display()))
        });
    }
    for (model, method) in cases {
        let case = format!("{model}/{method}");
        checks.guard("adapter", &case, |checks| {
            let train_device = device.clone().autodiff();
            let expected = Expected::read(
                &fixtures.join(format!("expected/adapters/{model}-{method}.safetensors")),
            )?;
            let peft = load_peft(fixtures, &model, &method, &train_device)?;
            let mask = expected.ints("attention_mask", &train_device)?;
            let ours = values(peft.forward(
                expected.ints("input_ids", &train_device)?,
                Some(mask.clone()),
            ));
            let theirs = expected.floats("logits")?;
            let real: Vec<i64> = mask
                .into_data()
                .try_into_vec_as()
                .map_err(|e| format!("{e:?}"))?;
            let vocab = ours.len() / real.len().max(1);
            let diff = real
                .iter()
                .enumerate()
                .filter(|(_, m)| **m == 1)
                .map(|(i, _)| {
                    max_diff(
                        &ours[i * vocab..(i + 1) * vocab],
                        &theirs[i * vocab..(i + 1) * vocab],
                    )
                })
                .fold(0.0, f64::max);
            checks.within("adapter", &case, "max |logits - PEFT|", diff, 1e-4);

            let loss = peft.loss(
                expected.ints("input_ids", &train_device)?,
                Some(expected.ints("attention_mask", &train_device)?),
                expected.ints("labels", &train_device)?,
            );
            let ours = values(loss.clone())[0];
            let theirs = expected.floats("loss")?[0];
            checks.within(
                "adapter",
                &case,
                "|loss - PEFT|",
                f64::from((ours - theirs).abs()),
                1e-5,
            );

            let grads = GradientsParams::from_grads(loss.backward(), &peft);
            // Floats copied now: CubeCL's CPU runtime reads a tensor without copying it (the data
            // is its buffer), and the step below updates that buffer in place.
            let floats = |data: TensorData| -> Result<Vec<f32>, String> {
                data.convert::<f32>()
                    .try_to_vec::<f32>()
                    .map_err(|e| format!("{e:?}"))
            };
            let before = trainable_tensors(&peft)
                .into_iter()
                .map(|(_, data)| floats(data))
                .collect::<Result<Vec<_>, _>>()?;
            let stepped = SgdConfig::new().init().step(0.1, peft, grads);
            let (mut worst, mut moved) = (0.0f64, 0.0f64);
            for ((key, after), before) in trainable_tensors(&stepped).into_iter().zip(before) {
                // Every tensor that trains is compared: a key the fixture lacks is a failure.
                let theirs = expected.floats(&key)?;
                worst = worst.max(max_diff(&floats(after)?, &theirs));
                moved = moved.max(max_diff(&before, &theirs));
            }
            checks.within("adapter", &case, "max |after SGD step - PEFT|", worst, 1e-5);
            // The step was not vacuous: PEFT's values moved away from the starting ones.
            if moved <= 1e-4 {
                return Err(format!("the SGD step barely moved anything ({moved:e})"));
            }

            // Greedy generation, token-identical to PEFT's.
            let greedy_file = fixtures.join(format!(
                "expected/adapters/{model}-{method}-greedy.safetensors"
            ));
            let greedy = if greedy_file.is_file() {
                Expected::read(&greedy_file)?
            } else {
                expected
            };
            if greedy.0.contains_key("greedy_tokens") {
                let peft = load_peft(fixtures, &model, &method, device)?;
                let theirs = greedy.rows("greedy_tokens")?;
                let config = GenerationConfig::new().with_max_new_tokens(theirs[0].len());
                let mut mismatched = 0;
                for (prompt, theirs) in greedy.rows("greedy_prompts")?.iter().zip(&theirs) {
                    let prompt: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
                    let out = peft
                        .generate(std::slice::from_ref(&prompt), &config, |_| {
                            ControlFlow::Continue(())
                        })
                        .map_err(|e| e.to_string())?;
                    let ours: Vec<i64> = out.new_tokens[0].iter().map(|&t| i64::from(t)).collect();
                    if &ours != theirs {
                        mismatched += 1;
                    }
                }
                checks.within(
                    "generate",
                    &case,
                    "prompts whose greedy tokens differ from PEFT's",
                    f64::from(mismatched),
                    0.0,
                );
            }
            Ok(())
        });
    }
}

/// 24 prompt/completion rows on the Qwen2 fixture's tokenizer.
fn training_rows(fixtures: &Path) -> Result<Vec<TokenizedExample>, String> {
    let words = ["cat", "dog", "sun", "tree", "red", "blue"];
    let jsonl: String = (0..24)
        .map(|i| {
            let w = words[i % words.len()];
            let reversed: String = w.chars().rev().collect();
            format!("{{\"prompt\": \"Reverse {w} {i}: \", \"completion\": \"{reversed}\"}}\n")
        })
        .collect();
    let dataset = Dataset::from_jsonl_str(Path::new("rows.jsonl"), &jsonl, &DataOptions::default())
        .map_err(|e| e.to_string())?;
    let tokenizer =
        load_tokenizer(fixtures.join("models/qwen2-gqa-tied")).map_err(|e| e.to_string())?;
    Ok(TokenizedDataset::new(
        dataset,
        &TokenizerEncoder(&tokenizer),
        &TokenizeOptions {
            max_length: 32,
            eos_token_id: Some(0),
            skip_bad_rows: false,
        },
    )
    .map_err(|e| e.to_string())?
    .examples)
}

/// Stops a run after `steps` steps.
struct StopAfter(usize);

impl TrainingObserver for StopAfter {
    fn on_step(&mut self, m: &StepMetrics) -> ControlFlow<()> {
        if m.step >= self.0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// The losses of `steps` training steps of `adapter` on `device`.
/// How a check's run is laid out: data-parallel replicas (their devices, the first the model's)
/// and the rows per replica and step.
struct Layout {
    replicas: Vec<Device>,
    sync: GradientSync,
    batch_size: usize,
    accumulation: usize,
}

impl Layout {
    fn one_device() -> Self {
        Self {
            replicas: Vec::new(),
            sync: GradientSync::Gather,
            batch_size: 4,
            accumulation: 1,
        }
    }
}

fn train_losses(
    fixtures: &Path,
    adapter: &AutoAdapterConfig,
    device: &Device,
    rows: &[TokenizedExample],
    steps: usize,
    dir: &Path,
    layout: &Layout,
) -> Result<Vec<f64>, String> {
    let device = device.clone().autodiff();
    let base =
        AutoCausalLm::from_pretrained(fixtures.join("models/qwen2-gqa-tied"), &device, DType::F32)
            .map_err(|e| e.to_string())?;
    // The same initial adapter on both devices: each backend has its own generator, so the
    // initial values are drawn once on the reference device and forked to this one.
    let init_device = reference_device()
        .unwrap_or_else(|| device.clone())
        .autodiff();
    init_device.seed(7);
    let init_base = AutoCausalLm::from_pretrained(
        fixtures.join("models/qwen2-gqa-tied"),
        &init_device,
        DType::F32,
    )
    .map_err(|e| e.to_string())?;
    let initial = adapter.init(&init_base, &[]).map_err(|e| e.to_string())?;
    let model = PeftModel::new(base, initial.fork(&device));
    let _ = std::fs::remove_dir_all(dir);
    let config = TrainingConfig::new()
        .with_lr(1e-2)
        .with_batch_size(layout.batch_size)
        .with_gradient_accumulation_steps(layout.accumulation)
        .with_epochs(steps.div_ceil(rows.len().div_ceil(8)))
        .with_eval_at_start(false)
        .with_save_steps(Some(usize::MAX));
    let run = TrainingRun {
        output_dir: dir.to_path_buf(),
        pad_token_id: 0,
        eos_token_ids: vec![0],
        base_model_name_or_path: None,
        resume: false,
        devices: layout
            .replicas
            .iter()
            .map(|d| d.clone().autodiff())
            .collect(),
        gradient_sync: layout.sync,
    };
    train(model, rows, None, &config, &run, &mut StopAfter(steps)).map_err(|e| e.to_string())?;
    let losses = read_metrics(&dir.join(METRICS_FILE))
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|m| match m {
            MetricsLine::Train(t) => Some(t.loss),
            MetricsLine::Eval(_) => None,
        })
        .collect();
    let _ = std::fs::remove_dir_all(dir);
    Ok(losses)
}

/// Flex, when compiled in: the reference the device's training is compared with.
fn reference_device() -> Option<Device> {
    #[cfg(feature = "flex")]
    {
        Some(Device::flex())
    }
    #[cfg(not(feature = "flex"))]
    {
        None
    }
}

fn training_against_flex(checks: &mut Checks, fixtures: &Path, device: &Device, steps: usize) {
    let Some(reference) = reference_device() else {
        checks.guard("train", "flex", |_| {
            Err(
                "built without the flex feature: nothing to compare the device's training with"
                    .into(),
            )
        });
        return;
    };
    let rows = match training_rows(fixtures) {
        Ok(rows) => rows,
        Err(e) => {
            checks.guard("train", "rows", |_| Err(e));
            return;
        }
    };
    let geometry = match AutoCausalLm::from_pretrained(
        fixtures.join("models/qwen2-gqa-tied"),
        &reference,
        DType::F32,
    ) {
        Ok(m) => m.geometry(),
        Err(e) => {
            checks.guard("train", "model", |_| Err(e.to_string()));
            return;
        }
    };
    for method in crate::bench::bench_methods() {
        let Some(adapter) = crate::bench::adapter_config(method, 4, &geometry) else {
            continue;
        };
        checks.guard("train", method.name(), |checks| {
            let scratch = checks.scratch.clone();
            let ours = train_losses(
                fixtures,
                &adapter,
                device,
                &rows,
                steps,
                &scratch.join("device"),
                &Layout::one_device(),
            )?;
            let flex = train_losses(
                fixtures,
                &adapter,
                &reference,
                &rows,
                steps,
                &scratch.join("flex"),
                &Layout::one_device(),
            )?;
            let _ = std::fs::remove_dir_all(&scratch);
            if ours.len() != steps || flex.len() != steps {
                return Err(format!(
                    "{} and {} steps, {steps} asked",
                    ours.len(),
                    flex.len()
                ));
            }
            let worst = ours
                .iter()
                .zip(&flex)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
                .fold(0.0, f64::max);
            checks.within(
                "train",
                method.name(),
                "max relative |loss - Flex's| over the steps",
                worst,
                1e-3,
            );
            // Training happened: the last quarter's mean loss is below the first quarter's.
            let quarter = (steps / 4).max(1);
            let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
            let rise = mean(&flex[steps - quarter..]) - mean(&flex[..quarter]);
            checks.within(
                "train",
                method.name(),
                "Flex's loss rise, last quarter's mean - first's",
                rise,
                0.0,
            );
            Ok(())
        });
    }
}

/// Data parallelism over two devices of this machine (two GPUs), gathered and all-reduced: the
/// same losses as one device accumulating the same shards. Skipped (recorded, not failed) on a
/// machine with fewer devices, such as the one GPU a draw lends.
fn data_parallel(checks: &mut Checks, fixtures: &Path) {
    let devices = match peft::data_parallel_devices(2) {
        Ok(devices) if devices[0] != devices[1] => devices,
        Ok(_) | Err(_) => {
            checks.skip(
                "data-parallel",
                "2 devices",
                Skip::Hardware,
                "this machine has one device of the backend; the check needs two".into(),
            );
            checks.save_or_warn();
            return;
        }
    };
    let rows = match training_rows(fixtures) {
        Ok(rows) => rows,
        Err(e) => {
            checks.guard("data-parallel", "rows", |_| Err(e));
            return;
        }
    };
    let geometry = match AutoCausalLm::from_pretrained(
        fixtures.join("models/qwen2-gqa-tied"),
        &devices[0],
        DType::F32,
    ) {
        Ok(m) => m.geometry(),
        Err(e) => {
            checks.guard("data-parallel", "model", |_| Err(e.to_string()));
            return;
        }
    };
    for method in crate::bench::bench_methods() {
        let Some(adapter) = crate::bench::adapter_config(method, 4, &geometry) else {
            continue;
        };
        checks.guard("data-parallel", method.name(), |checks| {
            let scratch = checks.scratch.clone();
            let accumulated = Layout {
                replicas: Vec::new(),
                sync: GradientSync::Gather,
                batch_size: 4,
                accumulation: 2,
            };
            let reference = train_losses(
                fixtures,
                &adapter,
                &devices[0],
                &rows,
                8,
                &scratch.join("one"),
                &accumulated,
            )?;
            for sync in [GradientSync::Gather, GradientSync::AllReduce] {
                let layout = Layout {
                    replicas: devices.clone(),
                    sync,
                    batch_size: 4,
                    accumulation: 1,
                };
                let losses = train_losses(
                    fixtures,
                    &adapter,
                    &devices[0],
                    &rows,
                    8,
                    &scratch.join("two"),
                    &layout,
                )?;
                let worst = losses
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1e-12))
                    .fold(
                        if losses.len() == 8 && reference.len() == 8 {
                            0.0
                        } else {
                            f64::INFINITY
                        },
                        f64::max,
                    );
                checks.within(
                    "data-parallel",
                    method.name(),
                    if sync == GradientSync::Gather {
                        "2 devices gathered: max relative |loss - 1 device accumulating|"
                    } else {
                        "2 devices all-reduced: max relative |loss - 1 device accumulating|"
                    },
                    worst,
                    1e-5,
                );
            }
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(())
        });
    }
}

/// The first Python that imports torch, transformers and peft.
fn find_python() -> Option<PathBuf> {
    ["/work/venv/bin/python", ".venv/bin/python", "python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            std::process::Command::new(p)
                .args(["-c", "import torch, transformers, peft"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// `bench --compare` (our side only when no Python with torch is found), one method at a time
/// so that the budget can stop between them; each method's JSON and table join the results.
fn run_bench(checks: &mut Checks, args: &GpuCheckArgs) {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        bench: crate::bench::BenchArgs,
    }
    let python = if args.no_compare {
        None
    } else {
        args.python.clone().or_else(find_python)
    };
    let mut shape: Vec<String> = if args.quick {
        vec![
            "--config".into(),
            args.fixtures
                .join("models/qwen2-gqa-tied/config.json")
                .display()
                .to_string(),
            "--batch".into(),
            "2".into(),
            "--seq-len".into(),
            "64".into(),
            "--new-tokens".into(),
            "4".into(),
            "--reps".into(),
            "1".into(),
        ]
    } else {
        vec![
            "--config".into(),
            args.fixtures
                .join("configs/qwen2.5-0.5b/config.json")
                .display()
                .to_string(),
            "--dtype".into(),
            "bf16".into(),
            "--batch".into(),
            "8".into(),
            "--seq-len".into(),
            "512".into(),
        ]
    };
    if let Some(python) = &python {
        shape.extend([
            "--compare".into(),
            "--python".into(),
            python.display().to_string(),
        ]);
    }
    for method in &args.bench_methods {
        let json_path = checks.scratch.join(format!("bench-{method}.json"));
        let mut argv: Vec<String> = vec![
            "bench".into(),
            "--workloads".into(),
            "train,forward,generate".into(),
            "--methods".into(),
            method.clone(),
        ];
        argv.extend(shape.iter().cloned());
        argv.extend(["--json".into(), json_path.display().to_string()]);
        checks.guard("bench", method, |checks| {
            let wrap = Wrap::try_parse_from(&argv).map_err(|e| e.to_string())?;
            crate::bench::bench(&wrap.bench)?;
            let text = std::fs::read_to_string(&json_path)
                .map_err(|e| format!("{}: {e}", json_path.display()))?;
            let _ = std::fs::remove_file(&json_path);
            let parsed: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let table = crate::bench::table_of(&parsed);
            checks.bench.push(json!({
                "method": method,
                "args": argv,
                "compared_with_torch": python.is_some(),
                "results": parsed,
                "table": table,
            }));
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
    }

    /// Runs gpu-check on the committed fixtures with `args`, into a fresh folder.
    fn run(args: &[&str]) -> (tempfile::TempDir, Result<Summary, String>) {
        let out = tempfile::tempdir().unwrap();
        let (out_arg, fixtures) = (out.path().display().to_string(), fixtures());
        let fixtures_arg = fixtures.display().to_string();
        let mut argv = vec!["--out", &out_arg, "--fixtures", &fixtures_arg];
        argv.extend_from_slice(args);
        let summary = gpu_check(&GpuCheckArgs::try_parse_from_for_test(&argv));
        (out, summary)
    }

    /// The JSON a run wrote.
    fn results(out: &tempfile::TempDir) -> Value {
        let text = std::fs::read_to_string(out.path().join("gpu-check.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn a_dry_run_on_the_cpu_passes_every_check_and_writes_the_json_and_table() {
        let (out, summary) = run(&["--train-steps", "8", "--quick", "--no-compare"]);
        assert_eq!(
            summary.unwrap(),
            Summary {
                failed: 0,
                skipped: 1,
                skipped_for_budget: 0
            },
            "a check failed on the CPU"
        );
        let json = results(&out);
        assert_eq!(json["failed"], 0);
        let records = json["records"].as_array().unwrap();
        for section in ["model", "adapter", "generate", "train"] {
            let n = records.iter().filter(|r| r["section"] == section).count();
            assert!(n >= 6, "{section}: {n} checks");
        }
        // 15 fixture models in f32 and the bf16 one; every method trained against Flex.
        assert!(records.iter().filter(|r| r["section"] == "model").count() >= 16);
        assert_eq!(
            records.iter().filter(|r| r["section"] == "train").count(),
            12
        );
        // The bench: one entry per default method, each with its results and table.
        let bench = json["bench"].as_array().unwrap();
        let methods: Vec<&str> = bench
            .iter()
            .map(|b| b["method"].as_str().unwrap())
            .collect();
        assert_eq!(methods, ["base", "prompt-tuning", "prefix-tuning"]);
        for b in bench {
            let ours = &b["results"]["shapes"][0]["ours"][0];
            assert_eq!(ours["method"], b["method"]);
            assert!(
                ours["forward_tokens_per_s"].as_f64().unwrap() > 0.0,
                "{ours}"
            );
            // The base trains nothing; the methods' steps are measured against the peak.
            if b["method"] != "base" {
                assert!(ours["train_tokens_per_s"].as_f64().unwrap() > 0.0, "{ours}");
                assert!(ours["train_fraction_of_device_peak"].as_f64().unwrap() > 0.0);
            }
        }
        assert_eq!(json["finished"], true);
        let table = std::fs::read_to_string(out.path().join("gpu-check.md")).unwrap();
        assert!(table.contains("| adapter |"), "{table}");
        assert!(table.contains("prefix-tuning  burn"), "{table}");
        // Nothing but the results is left in the folder the device tool brings back.
        let mut left: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["gpu-check.json", "gpu-check.md"]);
    }

    #[test]
    fn a_spent_budget_skips_every_check_but_still_writes_the_results() {
        let (out, summary) = run(&[
            "--quick",
            "--no-compare",
            "--budget-s",
            "0",
            "--sections",
            "model,bench",
        ]);
        let summary = summary.unwrap();
        assert_eq!(summary.failed, 0);
        // Every fixture model, then the three benched methods, each recorded as skipped.
        let models = fixture_models(&fixtures()).len();
        assert!(models >= 15, "{models} fixture models");
        assert_eq!(summary.skipped_for_budget, models + 3);
        let json = results(&out);
        assert_eq!(json["skipped_for_budget"], models + 3);
        let records = json["records"].as_array().unwrap();
        assert!(records.iter().all(|r| r["skipped"] == "time budget"));
        // Only the sections asked for.
        assert!(
            records
                .iter()
                .all(|r| r["section"] == "model" || r["section"] == "bench")
        );
        let table = std::fs::read_to_string(out.path().join("gpu-check.md")).unwrap();
        assert!(
            table.contains("SKIPPED bench prefix-tuning: the time budget (0 s)"),
            "{table}"
        );
    }

    #[test]
    fn cases_runs_only_the_cases_whose_name_contains_it() {
        let (out, summary) = run(&["--sections", "model,adapter", "--cases", "qwen3-tied"]);
        assert_eq!(summary.unwrap().failed, 0);
        let json = results(&out);
        let cases: std::collections::BTreeSet<&str> = json["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["case"].as_str().unwrap())
            .collect();
        // The model and each of its adapters, nothing else.
        assert!(cases.contains("qwen3-tied"), "{cases:?}");
        assert!(cases.len() >= 2, "{cases:?}");
        assert!(
            cases.iter().all(|c| c.starts_with("qwen3-tied")),
            "{cases:?}"
        );
    }

    #[test]
    fn a_budget_that_is_not_a_number_of_seconds_is_refused() {
        for bad in ["-1", "NaN", "inf"] {
            let err = run(&[&format!("--budget-s={bad}")]).1.unwrap_err();
            assert!(err.contains("--budget-s"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_unknown_bench_method_is_refused_before_anything_runs() {
        let (out, summary) = run(&["--bench-methods", "base,lora"]);
        let err = summary.unwrap_err();
        assert!(
            err.contains("\"lora\"") && err.contains("prefix-tuning"),
            "{err}"
        );
        assert!(!out.path().join("gpu-check.json").exists());
    }

    #[test]
    fn results_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu-check.json");
        write_replacing(&path, "first").unwrap();
        write_replacing(&path, "second").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
    }
}
