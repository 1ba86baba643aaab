//! The training loop: AdamW on the trainable parameters, linear warmup and decay, gradient
//! accumulation, global-norm clipping, periodic evaluation, a NaN/inf guard, and resumable
//! checkpoints that hold the adapter and the optimizer state only.
//!
//! The loop reports through a [`TrainingObserver`] (the CLI draws a progress bar with it) and
//! appends one JSON object per logged step or evaluation to `metrics.jsonl` in the output
//! directory. Library code never prints.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::distributed::{ReduceOperation, all_reduce};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    CheckpointError, OPTIMIZER_STATE, TrainerState, latest_checkpoint, read_trainer_state,
    write_checkpoint,
};
use crate::data::{Batch, TokenizedExample, epoch_order, length_grouped_order};
use crate::optim::{AdamW, AdamWConfig, clip_coefficient, global_grad_norm};
use peft_core::adapter::Adapter;
use peft_core::adapter_config::AdapterError;
use peft_core::adapter_file::AdapterFileError;
use peft_core::error::CoreError;
use peft_core::generation::GenerationConfig;
use peft_core::model::CausalLm;
use peft_core::params::TrainableParameters;
use peft_core::peft_model::PeftModel;

/// Metrics file written in the output directory, one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Hyper-parameters of a run. Defaults follow Hugging Face's `Trainer` where it has one.
#[derive(Config, Debug)]
pub struct TrainingConfig {
    /// Peak learning rate (reached after warmup).
    #[config(default = 1e-3)]
    pub lr: f64,
    /// Passes over the training rows.
    #[config(default = 1)]
    pub epochs: usize,
    /// Rows per micro-batch.
    #[config(default = 8)]
    pub batch_size: usize,
    /// Micro-batches whose gradients add up to one optimizer step.
    #[config(default = 1)]
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps over which the learning rate rises linearly from 0; it then falls
    /// linearly to 0 at the last step (`get_linear_schedule_with_warmup`).
    #[config(default = 0)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (`clip_grad_norm_`); `None` disables clipping.
    #[config(default = "Some(1.0)")]
    pub max_grad_norm: Option<f64>,
    /// AdamW settings (PyTorch's defaults).
    #[config(default = "AdamWConfig::new()")]
    pub optimizer: AdamWConfig,
    /// Seed of the data order and of dropout.
    #[config(default = 42)]
    pub seed: u64,
    /// Batch rows of similar length ([`length_grouped_order`]): less padding, so less compute
    /// per epoch on ragged rows; batches are still drawn in a seeded, shuffled order.
    #[config(default = false)]
    pub group_by_length: bool,
    /// Evaluate every this many optimizer steps; `None`: at the end of each epoch.
    pub eval_steps: Option<usize>,
    /// Checkpoint every this many optimizer steps; `None`: at the end of each epoch.
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints, the newest (`None`: keep them all, as Hugging Face's
    /// `save_total_limit` does by default; ours keeps one, all that resuming needs).
    #[config(default = "Some(1)")]
    pub save_total_limit: Option<usize>,
    /// Append a training line to the metrics file every this many steps.
    #[config(default = 1)]
    pub logging_steps: usize,
    /// Rows per evaluation batch.
    #[config(default = 16)]
    pub eval_batch_size: usize,
    /// Score greedy completions against the targets during evaluation (exact match).
    #[config(default = true)]
    pub eval_exact_match: bool,
    /// Also evaluate before the first step (the untrained adapter), as step 0.
    #[config(default = true)]
    pub eval_at_start: bool,
}

/// What the run needs besides hyper-parameters.
#[derive(Debug, Clone)]
pub struct TrainingRun {
    /// Directory of the checkpoints and the metrics file.
    pub output_dir: PathBuf,
    /// Id that pads batches.
    pub pad_token_id: u32,
    /// Ids that end a generation (exact match).
    pub eos_token_ids: Vec<u32>,
    /// Recorded in the adapter config.
    pub base_model_name_or_path: Option<String>,
    /// Continue from the newest checkpoint in `output_dir`, if any.
    pub resume: bool,
    /// Data parallelism: the devices of the replicas, the model's own first (empty: the model's
    /// device alone). Every optimizer step gives each replica its own `batch_size` rows, so N
    /// devices take N x `batch_size` rows per micro-batch and their update equals one device's
    /// with a batch N times larger (see [`train`]). With dropout (`encoder_dropout`,
    /// `prefix_dropout`) on distinct devices the replicas draw their masks at once from the
    /// backend's one generator, so which replica gets which draw depends on timing: such a run
    /// is not repeatable to the bit, nor is its resume (on one device, or without dropout, both
    /// are).
    pub devices: Vec<Device>,
    /// How replicas on distinct devices combine their gradients.
    pub gradient_sync: GradientSync,
}

/// How data-parallel replicas on distinct devices combine their gradients (replicas that share a
/// device always accumulate in place).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GradientSync {
    /// Each replica's gradients are copied to the first device and added there, as burn-train's
    /// multi-device strategy does: works on every backend. An adapter's gradients are small
    /// (kilobytes to a few megabytes), so the copies cost little.
    #[default]
    Gather,
    /// burn's collective all-reduce (`burn::tensor::distributed::all_reduce`, a sum): NCCL on
    /// CUDA, which needs `libnccl` at run time. burn 0.22.1 implements it for CUDA only; other
    /// backends panic.
    AllReduce,
}

/// Why training stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A hyper-parameter is out of its domain, or the run cannot start as asked.
    #[error("{key}: {message}")]
    Config {
        /// The [`TrainingConfig`] field (`optimizer.beta_1` for the optimizer's), or the
        /// [`TrainingRun`] field (`output_dir`, `resume`), or `train` for the rows.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// The loss or the gradients stopped being finite.
    #[error(
        "step {step}: {what} is {value}; training stopped (lower the learning rate, or check the rows at lines {lines:?})"
    )]
    NonFinite {
        /// Optimizer step (1-based) being computed.
        step: usize,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The value seen.
        value: f64,
        /// Data lines of the batch.
        lines: Vec<usize>,
    },
    /// Writing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint to resume was made with another data order.
    #[error(
        "{path}: the checkpoint was made with {key} {was}, this run has {is}; resuming would \
         change the data order (use the same settings, or another output directory)"
    )]
    DifferentRun {
        /// The checkpoint's trainer state.
        path: PathBuf,
        /// The [`TrainingConfig`] field that differs (`train` for the rows).
        key: &'static str,
        /// Its value in the checkpoint.
        was: String,
        /// Its value now.
        is: String,
    },
    /// The adapter of a checkpoint cannot be read or written.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The optimizer state cannot be read or written.
    #[error(transparent)]
    File(#[from] AdapterFileError),
    /// Evaluation (generation) failed.
    #[error("evaluation: {0}")]
    Eval(#[from] CoreError),
    /// The metrics file cannot be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
}

/// How a run is laid out, known before the first step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingPlan {
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
    /// Optimizer steps in the run.
    pub total_steps: usize,
    /// Step the run starts from (non-zero when resumed).
    pub start_step: usize,
}

/// One optimizer step, as logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step, 1-based.
    pub step: usize,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Mean loss over the step's scored tokens.
    pub loss: f64,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens (prompt and target) processed per second in this step.
    pub tokens_per_second: f64,
    /// Wall time of the step (forward, backward and update), in seconds.
    #[serde(default)]
    pub seconds: f64,
    /// Data lines (1-based) of the step's rows, in the order they were batched: a run's batch
    /// order can be replayed from them (`scripts/peft_train.py --order-from`).
    #[serde(default)]
    pub lines: Vec<usize>,
}

/// An evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Optimizer steps taken when it ran (0 = before training).
    pub step: usize,
    /// Mean loss over every scored token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Fraction of prompt/completion rows whose greedy completion equals the target, when
    /// measured.
    pub exact_match: Option<f64>,
    /// Rows evaluated.
    pub rows: usize,
}

/// One line of the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsLine {
    /// A training step.
    Train(StepMetrics),
    /// An evaluation.
    Eval(EvalMetrics),
}

impl MetricsLine {
    fn step(&self) -> usize {
        match self {
            Self::Train(m) => m.step,
            Self::Eval(m) => m.step,
        }
    }
}

/// Receives progress; returning `ControlFlow::Break` from [`TrainingObserver::on_step`] stops the
/// run after that step (as an interruption would: no final checkpoint is written).
pub trait TrainingObserver {
    /// Before the first step.
    fn on_start(&mut self, _plan: &TrainingPlan) {}
    /// After each optimizer step.
    fn on_step(&mut self, _metrics: &StepMetrics) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    /// After each evaluation.
    fn on_eval(&mut self, _metrics: &EvalMetrics) {}
    /// After a checkpoint was written.
    fn on_checkpoint(&mut self, _dir: &Path) {}
}

/// An observer that does nothing.
impl TrainingObserver for () {}

/// How a run ended.
pub struct TrainOutcome<M: Module, A: Module> {
    /// The trained model (on the training device).
    pub model: PeftModel<M, A>,
    /// Optimizer steps taken in all.
    pub global_step: usize,
    /// False when the observer stopped the run early.
    pub completed: bool,
    /// The last evaluation, if any ran.
    pub last_eval: Option<EvalMetrics>,
}

/// The learning rate of optimizer step `step` (0-based), as
/// `transformers.get_linear_schedule_with_warmup`.
pub fn linear_schedule(lr: f64, step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
    if step < warmup_steps {
        return lr * step as f64 / warmup_steps.max(1) as f64;
    }
    let remaining = total_steps.saturating_sub(step) as f64;
    lr * (remaining / total_steps.saturating_sub(warmup_steps).max(1) as f64).max(0.0)
}

/// FNV-1a over the rows' ids and labels: a cheap identity of the training data.
fn fingerprint(rows: &[TokenizedExample]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for byte in v.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for row in rows {
        eat(row.input_ids.len() as u64);
        row.input_ids.iter().for_each(|&t| eat(u64::from(t)));
        row.labels.iter().for_each(|&l| eat(l as u64));
    }
    format!("{hash:016x}")
}

impl TrainingConfig {
    /// Checks every setting is in its domain ([`train`] does this first; call it earlier to
    /// fail before loading a model).
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] naming the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let positive = |key, value: usize| {
            if value == 0 {
                Err(TrainError::Config {
                    key,
                    message: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("epochs", self.epochs)?;
        positive("batch_size", self.batch_size)?;
        positive(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
        )?;
        positive("logging_steps", self.logging_steps)?;
        positive("eval_batch_size", self.eval_batch_size)?;
        positive("eval_steps", self.eval_steps.unwrap_or(1))?;
        positive("save_steps", self.save_steps.unwrap_or(1))?;
        positive("save_total_limit", self.save_total_limit.unwrap_or(1))?;
        let check = |key, ok: bool, domain: &str, value: f64| {
            if ok {
                Ok(())
            } else {
                Err(TrainError::Config {
                    key,
                    message: format!("must be {domain}, found {value}"),
                })
            }
        };
        let lr = self.lr;
        check(
            "lr",
            lr.is_finite() && lr >= 0.0,
            "a finite number >= 0",
            lr,
        )?;
        if let Some(norm) = self.max_grad_norm {
            check(
                "max_grad_norm",
                norm.is_finite() && norm > 0.0,
                "a finite number > 0",
                norm,
            )?;
        }
        let adam = &self.optimizer;
        for (key, beta) in [
            ("optimizer.beta_1", adam.beta_1),
            ("optimizer.beta_2", adam.beta_2),
        ] {
            check(key, (0.0..1.0).contains(&beta), "in [0, 1)", beta)?;
        }
        let eps = adam.epsilon;
        check(
            "optimizer.epsilon",
            eps.is_finite() && eps > 0.0,
            "a finite number > 0",
            eps,
        )?;
        let decay = adam.weight_decay;
        check(
            "optimizer.weight_decay",
            decay.is_finite() && decay >= 0.0,
            "a finite number >= 0",
            decay,
        )?;
        Ok(())
    }

    /// Optimizer steps per epoch for `rows` training rows on one device.
    pub fn steps_per_epoch(&self, rows: usize) -> usize {
        self.steps_per_epoch_on(rows, 1)
    }

    /// Optimizer steps per epoch for `rows` training rows over `replicas` data-parallel
    /// replicas (each takes `batch_size` rows of every micro-batch).
    pub fn steps_per_epoch_on(&self, rows: usize, replicas: usize) -> usize {
        rows.div_ceil(self.batch_size * replicas.max(1))
            .div_ceil(self.gradient_accumulation_steps)
    }
}

/// Trains `model` (built on an autodiff device, adapter trainable) on `train`, evaluating on
/// `eval` if given.
///
/// Each optimizer step takes `gradient_accumulation_steps` micro-batches of the epoch's seeded
/// order; the loss of a step is the mean over all its scored tokens (micro-batches weighted by
/// their token counts, so the result does not depend on how a step is split). With
/// `run.resume`, the newest checkpoint's adapter, optimizer state and position are restored,
/// and the run continues exactly as if it had not stopped.
///
/// With several `run.devices`, each micro-batch of `batch_size` x devices rows is cut into one
/// `batch_size` shard per replica; each replica computes its shard's loss and gradients, the
/// gradients are gathered on the first device and added up weighted by scored tokens (as
/// burn-train's multi-device strategy gathers them: `GradientsParams::to_device`, then
/// accumulation), and one optimizer step there updates the trainable values, which are then
/// copied to the other replicas' copies of the model (the adapter, and the base's trainable
/// parameters: BitFit's biases). The update is the one a single device makes with the whole micro-batch (up to
/// the float noise of padding each shard to its own longest row). Replicas on distinct devices
/// run on one thread each; replicas that share a device (Flex has one) run one after the other,
/// on their copies as well, which gives no speed but the same result, and is how the
/// equivalence (copies included) is tested without GPUs.
/// Evaluation and checkpoints happen on the first device only.
///
/// Dropout draws come from the backend's generator, which each step seeds from `config.seed`.
/// burn's backends keep that generator per process, not per device or thread, so runs meant to
/// be reproducible (or resumed bit for bit) must not draw random numbers on other threads at
/// the same time.
///
/// # Errors
///
/// Bad hyper-parameters, a non-finite loss or gradient norm (the error names the step and the
/// data lines), a checkpoint that cannot be written, or one from another run or model.
pub fn train<M, A>(
    mut model: PeftModel<M, A>,
    train: &[TokenizedExample],
    eval: Option<&[TokenizedExample]>,
    config: &TrainingConfig,
    run: &TrainingRun,
    observer: &mut dyn TrainingObserver,
) -> Result<TrainOutcome<M, A>, TrainError>
where
    M: CausalLm,
    A: Adapter,
    PeftModel<M, A>: Module,
{
    config.validate()?;
    if train.is_empty() {
        return Err(TrainError::Config {
            key: "train",
            message: "no training rows".into(),
        });
    }
    if TrainableParameters::of(&model).trainable == 0 {
        return Err(TrainError::Config {
            key: "adapter",
            message: "has no trainable parameters: there is nothing to train".into(),
        });
    }
    let device = model.base.device();
    let devices = if run.devices.is_empty() {
        vec![device.clone()]
    } else {
        run.devices.clone()
    };
    if devices[0] != device {
        return Err(TrainError::Config {
            key: "devices",
            message: format!(
                "the first device must be the model's ({device:?}), found {:?}",
                devices[0]
            ),
        });
    }
    let replicas = devices.len();
    let steps_per_epoch = config.steps_per_epoch_on(train.len(), replicas);
    let total_steps = steps_per_epoch * config.epochs;
    let fingerprint = fingerprint(train);
    let mut optimizer = config.optimizer.init();
    let mut state = TrainerState {
        global_step: 0,
        epoch: 0,
        step_in_epoch: 0,
        seed: config.seed,
        batch_size: config.batch_size,
        gradient_accumulation_steps: config.gradient_accumulation_steps,
        group_by_length: config.group_by_length,
        devices: replicas,
        train_rows: train.len(),
        train_fingerprint: fingerprint,
    };
    if run.resume && latest_checkpoint(&run.output_dir)?.is_none() {
        // As Hugging Face's Trainer: asking to resume where there is nothing to resume from is
        // a mistake (a wrong directory), not a fresh start.
        return Err(TrainError::Config {
            key: "resume",
            message: format!(
                "{} holds no checkpoint to resume from",
                run.output_dir.display()
            ),
        });
    }
    std::fs::create_dir_all(&run.output_dir).map_err(|source| TrainError::Io {
        path: run.output_dir.clone(),
        source,
    })?;
    let metrics_path = run.output_dir.join(METRICS_FILE);
    if run.resume
        && let Some((_, dir)) = latest_checkpoint(&run.output_dir)?
    {
        let saved = read_trainer_state(&dir)?;
        check_same_run(&saved, &state, &dir)?;
        let (base, adapter) = A::load(&dir, model.base)?;
        model = PeftModel::new(base, adapter);
        optimizer.load(
            &dir.join(OPTIMIZER_STATE),
            &model,
            saved.global_step,
            &device,
        )?;
        state = saved;
        keep_metrics_up_to(&metrics_path, state.global_step)?;
    } else {
        if let Some((step, _)) = latest_checkpoint(&run.output_dir)? {
            return Err(TrainError::Config {
                key: "output_dir",
                message: format!(
                    "{} holds checkpoint-{step} of an earlier run: resume it, or train into \
                     another directory",
                    run.output_dir.display()
                ),
            });
        }

        keep_metrics_up_to(&metrics_path, 0)?;
    }
    let mut metrics = MetricsWriter::open(&metrics_path)?;
    observer.on_start(&TrainingPlan {
        steps_per_epoch,
        total_steps,
        start_step: state.global_step,
    });

    let virtual_tokens = model.adapter.num_virtual_tokens();
    let micro_batch = config.batch_size;
    // Rows of one micro-batch over every replica, and of one optimizer step.
    let round = micro_batch * replicas;
    let group = round * config.gradient_accumulation_steps;
    // Every replica but the first holds its own copy of the model (the frozen base forked once,
    // the trainable values after every step), on its device or, sharing the buffers, on the
    // model's: replicas taking turns on one device then run the same code as a multi-GPU run, so
    // the tests of one device check the copies too.
    let mut copies: Vec<Option<PeftModel<M, A>>> = devices
        .iter()
        .enumerate()
        .map(|(replica, d)| (replica > 0).then(|| model.clone().fork(d)))
        .collect();
    let distinct_devices = devices.iter().any(|d| d != &device);
    let mut last_eval = None;
    if let Some(eval) = eval
        && config.eval_at_start
        && state.global_step == 0
    {
        let result = evaluate(&model.valid(), eval, &EvalOptions::of(config, run), 0)?;
        metrics.write(&MetricsLine::Eval(result.clone()))?;
        observer.on_eval(&result);
        last_eval = Some(result);
    }
    let lengths: Vec<usize> = train.iter().map(|row| row.input_ids.len()).collect();
    while state.epoch < config.epochs {
        let order = if config.group_by_length {
            length_grouped_order(&lengths, round, config.seed, state.epoch)
        } else {
            epoch_order(train.len(), config.seed, state.epoch)
        };
        let steps: Vec<&[usize]> = order.chunks(group).collect();
        while state.step_in_epoch < steps.len() {
            let rows = steps[state.step_in_epoch];
            let started = Instant::now();
            // Dropout draws from the device's generator: seed it per step so a resumed run
            // draws what the uninterrupted one did.
            device.seed(config.seed.wrapping_add(state.global_step as u64));
            let batches: Vec<Vec<&TokenizedExample>> = rows
                .chunks(micro_batch)
                .map(|chunk| chunk.iter().map(|&i| &train[i]).collect())
                .collect();
            let scored: Vec<usize> = batches
                .iter()
                .map(|b| Batch::scored_labels(b, virtual_tokens))
                .collect();
            let total_scored = scored.iter().sum::<usize>().max(1);
            let lines = || rows.iter().map(|&i| train[i].line).collect::<Vec<_>>();
            let step_number = state.global_step + 1;
            let mut accumulator = GradientsAccumulator::new();
            let mut loss_sum = 0.0;
            let mut tokens = 0;
            // One round: a shard (micro-batch of `batch_size` rows) per replica.
            for (round_batches, round_scored) in
                batches.chunks(replicas).zip(scored.chunks(replicas))
            {
                let shards: Vec<Shard> = round_batches
                    .iter()
                    .zip(round_scored)
                    .enumerate()
                    .map(|(replica, (rows, &count))| Shard {
                        replica,
                        rows,
                        weight: count as f64 / total_scored as f64,
                    })
                    .collect();
                let mut results = run_shards(
                    &model,
                    &copies,
                    &devices,
                    shards,
                    run.pad_token_id,
                    virtual_tokens,
                );
                // A full round over distinct devices may sum its gradients with a collective;
                // the first replica then holds the sum and the others nothing.
                if run.gradient_sync == GradientSync::AllReduce
                    && results.len() == replicas
                    && distinct_devices
                {
                    let mut grads: Vec<GradientsParams> = results
                        .iter_mut()
                        .map(|r| std::mem::take(&mut r.2))
                        .collect();
                    model.visit(&mut AllReduce {
                        grads: &mut grads,
                        devices: &devices,
                    });
                    for (result, grads) in results.iter_mut().zip(grads) {
                        result.2 = grads;
                    }
                }
                for (result, &count) in results.into_iter().zip(round_scored) {
                    let (value, batch_tokens, grads) = result;
                    if !value.is_finite() {
                        return Err(TrainError::NonFinite {
                            step: step_number,
                            what: "loss",
                            value,
                            lines: lines(),
                        });
                    }
                    tokens += batch_tokens;
                    loss_sum += value * count as f64;
                    accumulator.accumulate(&model, grads.to_device(&device, &model));
                }
            }
            let grads = accumulator.grads();
            let grad_norm = global_grad_norm(&model, &grads);
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFinite {
                    step: step_number,
                    what: "gradient norm",
                    value: grad_norm,
                    lines: lines(),
                });
            }
            let lr = linear_schedule(
                config.lr,
                state.global_step,
                config.warmup_steps,
                total_steps,
            );
            model = optimizer.step(
                model,
                grads,
                lr,
                clip_coefficient(grad_norm, config.max_grad_norm),
            );
            refresh_copies(&model, &mut copies, &devices);
            let seconds = started.elapsed().as_secs_f64();
            state.global_step += 1;
            state.step_in_epoch += 1;
            let step = StepMetrics {
                step: state.global_step,
                epoch: state.epoch as f64 + state.step_in_epoch as f64 / steps.len() as f64,
                loss: loss_sum / total_scored as f64,
                lr,
                grad_norm,
                tokens_per_second: tokens as f64 / seconds.max(1e-9),
                seconds,
                lines: lines(),
            };
            if state.global_step.is_multiple_of(config.logging_steps) {
                metrics.write(&MetricsLine::Train(step.clone()))?;
            }
            let stop = observer.on_step(&step).is_break();

            let epoch_done = state.step_in_epoch == steps.len();
            if epoch_done {
                state.epoch += 1;
                state.step_in_epoch = 0;
            }
            let due = |every: Option<usize>| match every {
                Some(n) => state.global_step.is_multiple_of(n) || state.global_step == total_steps,
                None => epoch_done,
            };
            if let Some(eval) = eval
                && due(config.eval_steps)
            {
                let result = evaluate(
                    &model.valid(),
                    eval,
                    &EvalOptions::of(config, run),
                    state.global_step,
                )?;
                metrics.write(&MetricsLine::Eval(result.clone()))?;
                observer.on_eval(&result);
                last_eval = Some(result);
            }
            if due(config.save_steps) {
                let dir =
                    save_checkpoint(&model, &optimizer, &state, run, config.save_total_limit)?;
                observer.on_checkpoint(&dir);
            }
            if stop {
                return Ok(TrainOutcome {
                    model,
                    global_step: state.global_step,
                    completed: false,
                    last_eval,
                });
            }
            if epoch_done {
                break;
            }
        }
    }
    Ok(TrainOutcome {
        model,
        global_step: state.global_step,
        completed: true,
        last_eval,
    })
}

/// Sums every parameter's gradient over the replicas with burn's all-reduce, leaving the sum in
/// the first replica's gradients (the others' are dropped).
/// Brings the replicas' copies on other devices up to the model after an optimizer step: the
/// adapter, and every trainable parameter of the base (BitFit trains the base's own biases); the
/// frozen rest of the base was copied once.
fn refresh_copies<M, A>(
    model: &PeftModel<M, A>,
    copies: &mut [Option<PeftModel<M, A>>],
    devices: &[Device],
) where
    M: CausalLm,
    A: Adapter,
{
    /// The values of a module's trainable parameters by id (`GradientsParams` is burn's map of
    /// tensors of any rank by `ParamId`).
    struct Trainable(GradientsParams);
    impl ModuleVisitor for Trainable {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.0.register(param.id, param.val().detach());
            }
        }
    }
    /// Puts those values in place on `device`, as `Module::fork` would have copied them.
    struct Refresh<'a> {
        values: &'a GradientsParams,
        device: &'a Device,
    }
    impl ModuleMapper for Refresh<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(value) = self.values.get::<D>(param.id) else {
                return param;
            };
            let (id, old, mapper) = param.consume();
            let mut value = value.to_device(self.device).detach();
            if old.is_require_grad() {
                value = value.require_grad();
            }
            Param::from_mapped_value(id, value, mapper)
        }
    }
    if copies.iter().all(Option::is_none) {
        return;
    }
    let mut trainable = Trainable(GradientsParams::new());
    model.base.visit(&mut trainable);
    for (slot, device) in copies.iter_mut().zip(devices) {
        if let Some(copy) = slot.take() {
            let base = if trainable.0.is_empty() {
                copy.base
            } else {
                copy.base.map(&mut Refresh {
                    values: &trainable.0,
                    device,
                })
            };
            *slot = Some(PeftModel {
                base,
                adapter: model.adapter.clone().fork(device),
            });
        }
    }
}

struct AllReduce<'a> {
    grads: &'a mut [GradientsParams],
    devices: &'a [Device],
}

impl ModuleVisitor for AllReduce<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let parts: Vec<Option<Tensor<D>>> = self
            .grads
            .iter_mut()
            .map(|g| g.remove::<D>(param.id))
            .collect();
        if parts.iter().all(Option::is_none) {
            return;
        }
        // Every replica submits before any resolves: NCCL's first call per group waits for
        // all of them.
        let collectives: Vec<_> = parts
            .into_iter()
            .zip(self.devices)
            .map(|(part, device)| {
                let part = part.unwrap_or_else(|| {
                    // A parameter a replica's shard gave no gradient (none today: every shard
                    // reaches every trainable parameter) takes part as zeros.
                    Tensor::zeros(param.val().shape(), device)
                });
                all_reduce(part, ReduceOperation::Sum, self.devices.to_vec())
            })
            .collect();
        // Every replica's collective is resolved (each waits for its own device's reduction),
        // not only the first: an unresolved one's output may still be written by NCCL when the
        // device's next forward reuses its memory. The first replica's sum is kept.
        let mut sums: Vec<Tensor<D>> = collectives.into_iter().map(|c| c.resolve()).collect();
        if !sums.is_empty() {
            self.grads[0].register(param.id, sums.swap_remove(0));
        }
    }
}

/// One replica's part of a micro-batch.
struct Shard<'a> {
    replica: usize,
    rows: &'a [&'a TokenizedExample],
    /// The shard's scored tokens over the optimizer step's.
    weight: f64,
}

/// The loss (mean over the shard's scored tokens), the tokens and the gradients of the weighted
/// loss of each shard, in shard order, each on its replica's copy (the model itself for the
/// first). Shards on other devices than the model's run on their own threads; a shard on the
/// model's device runs on this thread, after the others were started.
fn run_shards<M, A>(
    model: &PeftModel<M, A>,
    copies: &[Option<PeftModel<M, A>>],
    devices: &[Device],
    shards: Vec<Shard<'_>>,
    pad_token_id: u32,
    virtual_tokens: usize,
) -> Vec<(f64, usize, GradientsParams)>
where
    M: CausalLm,
    A: Adapter,
    PeftModel<M, A>: Module,
{
    let compute = |model: &PeftModel<M, A>, shard: &Shard<'_>| {
        let device = &devices[shard.replica];
        let batch = Batch::collate(shard.rows, pad_token_id, virtual_tokens, device);
        let tokens = batch.tokens;
        let loss = model.loss(batch.input_ids, Some(batch.attention_mask), batch.labels);
        let value = f64::from(loss.clone().into_scalar::<f32>());
        let grads = loss.mul_scalar(shard.weight).backward();
        (value, tokens, GradientsParams::from_grads(grads, model))
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .map(|shard| match &copies[shard.replica] {
                Some(copy) if devices[shard.replica] != devices[0] => {
                    let copy = copy.clone();
                    let compute = &compute;
                    Some(scope.spawn(move || compute(&copy, shard)))
                }
                _ => None,
            })
            .collect();
        // Shards on the model's device run here, in order (one device computes one at a time).
        let local: Vec<_> = shards
            .iter()
            .zip(&handles)
            .map(|(shard, handle)| {
                handle
                    .is_none()
                    .then(|| compute(copies[shard.replica].as_ref().unwrap_or(model), shard))
            })
            .collect();
        handles
            .into_iter()
            .zip(local)
            .map(|(handle, local)| match (handle, local) {
                (Some(handle), _) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                (None, Some(result)) => result,
                (None, None) => unreachable!("each shard runs on a thread or here"),
            })
            .collect()
    })
}

fn check_same_run(saved: &TrainerState, now: &TrainerState, dir: &Path) -> Result<(), TrainError> {
    let differs = |key: &'static str, was: String, is: String| {
        Err(TrainError::DifferentRun {
            path: dir.join(crate::checkpoint::TRAINER_STATE),
            key,
            was,
            is,
        })
    };
    if saved.seed != now.seed {
        return differs("seed", saved.seed.to_string(), now.seed.to_string());
    }
    if saved.batch_size != now.batch_size {
        return differs(
            "batch_size",
            saved.batch_size.to_string(),
            now.batch_size.to_string(),
        );
    }
    if saved.gradient_accumulation_steps != now.gradient_accumulation_steps {
        return differs(
            "gradient_accumulation_steps",
            saved.gradient_accumulation_steps.to_string(),
            now.gradient_accumulation_steps.to_string(),
        );
    }
    if saved.devices != now.devices {
        return differs(
            "devices",
            saved.devices.to_string(),
            now.devices.to_string(),
        );
    }
    if saved.group_by_length != now.group_by_length {
        return differs(
            "group_by_length",
            saved.group_by_length.to_string(),
            now.group_by_length.to_string(),
        );
    }
    if saved.train_rows != now.train_rows || saved.train_fingerprint != now.train_fingerprint {
        return differs(
            "train",
            format!("{} rows ({})", saved.train_rows, saved.train_fingerprint),
            format!("{} rows ({})", now.train_rows, now.train_fingerprint),
        );
    }
    Ok(())
}

fn save_checkpoint<M: CausalLm, A: Adapter>(
    model: &PeftModel<M, A>,
    optimizer: &AdamW,
    state: &TrainerState,
    run: &TrainingRun,
    keep: Option<usize>,
) -> Result<PathBuf, TrainError> {
    write_checkpoint(&run.output_dir, state.global_step, state, keep, |dir| {
        model.save_pretrained(dir, run.base_model_name_or_path.as_deref())?;
        optimizer.save(&dir.join(OPTIMIZER_STATE))?;
        Ok::<(), TrainError>(())
    })
}

/// Drops lines of the metrics file past `step` (a resumed run rewrites them).
fn keep_metrics_up_to(path: &Path, step: usize) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<MetricsLine>(line).is_ok_and(|m| m.step() <= step && step > 0)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    peft_core::adapter_file::write_atomic(path, kept.as_bytes()).map_err(io)
}

struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    fn open(path: &Path) -> Result<Self, TrainError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| TrainError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(&mut self, line: &MetricsLine) -> Result<(), TrainError> {
        let json = serde_json::to_string(line).expect("metrics serialize");
        writeln!(self.file, "{json}").map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads a metrics file written by [`train`].
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

/// How an evaluation batches rows and scores completions.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Rows per batch.
    pub batch_size: usize,
    /// Also score greedy completions (exact match).
    pub exact_match: bool,
    /// Id that pads batches.
    pub pad_token_id: u32,
    /// Ids that end a generation.
    pub eos_token_ids: Vec<u32>,
}

impl EvalOptions {
    /// The evaluation settings of a training run.
    pub fn of(config: &TrainingConfig, run: &TrainingRun) -> Self {
        Self {
            batch_size: config.eval_batch_size,
            exact_match: config.eval_exact_match,
            pad_token_id: run.pad_token_id,
            eos_token_ids: run.eos_token_ids.clone(),
        }
    }
}

/// Loss, perplexity and (for prompt/completion rows, when `options.exact_match`) exact-match
/// accuracy of `model` on `rows`, recorded as taken after `step` optimizer steps.
///
/// Exact match: the greedy completion of the prompt begins with the target, EOS included (so
/// the model must also stop there).
pub fn evaluate<M: CausalLm, A: Adapter>(
    model: &PeftModel<M, A>,
    rows: &[TokenizedExample],
    options: &EvalOptions,
    step: usize,
) -> Result<EvalMetrics, CoreError> {
    let device = model.base.device();
    let virtual_tokens = model.adapter.num_virtual_tokens();
    let batch_size = options.batch_size.max(1);
    let mut loss_sum = 0.0;
    let mut scored = 0;
    for chunk in rows.chunks(batch_size) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let batch = Batch::collate(&refs, options.pad_token_id, virtual_tokens, &device);
        let loss: f32 = model
            .loss(batch.input_ids, Some(batch.attention_mask), batch.labels)
            .into_scalar();
        loss_sum += f64::from(loss) * batch.scored as f64;
        scored += batch.scored;
    }
    let loss = loss_sum / scored.max(1) as f64;
    let exact_match = if options.exact_match {
        exact_match(model, rows, options)?
    } else {
        None
    };
    Ok(EvalMetrics {
        step,
        loss,
        perplexity: loss.exp(),
        exact_match,
        rows: rows.len(),
    })
}

/// Fraction of prompt/completion rows whose greedy completion is exactly the target (see
/// [`evaluate`]); `None` when there are no such rows.
pub fn exact_match<M: CausalLm, A: Adapter>(
    model: &PeftModel<M, A>,
    rows: &[TokenizedExample],
    options: &EvalOptions,
) -> Result<Option<f64>, CoreError> {
    let completions: Vec<&TokenizedExample> = rows.iter().filter(|r| r.is_completion()).collect();
    if completions.is_empty() {
        return Ok(None);
    }
    let mut hits = 0;
    for chunk in completions.chunks(options.batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|r| r.prompt_ids().to_vec()).collect();
        let longest = chunk
            .iter()
            .map(|r| r.target_ids().len())
            .max()
            .unwrap_or(1);
        let config = GenerationConfig::new()
            .with_max_new_tokens(longest)
            .with_eos_token_ids(options.eos_token_ids.clone())
            .with_pad_token_id(options.pad_token_id);
        let output = model.generate(&prompts, &config, |_| ControlFlow::Continue(()))?;
        // The target ends with EOS (when the data has one), so this also asks the model to stop.
        hits += chunk
            .iter()
            .zip(&output.new_tokens)
            .filter(|(row, generated)| generated.starts_with(row.target_ids()))
            .count();
    }
    Ok(Some(hits as f64 / completions.len() as f64))
}

/// What the model does with one evaluation row (`peft eval --predictions`).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Mean cross-entropy over the row's scored tokens, the row alone (no padding).
    pub loss: f64,
    /// Tokens the loss scored.
    pub scored: usize,
    /// Greedy continuation of the prompt, as long as the target at most (an EOS included when
    /// generated); `None` for text rows or without exact match.
    pub generated: Option<Vec<u32>>,
    /// Whether `generated` starts with the target (EOS included); `None` as `generated`.
    pub exact_match: Option<bool>,
}

/// One [`Prediction`] per row, in row order, handed to `each` batch by batch as they are
/// computed (so a caller can stream them to a file); `each` may stop early with
/// `ControlFlow::Break`. Greedy continuations are generated `options.batch_size` rows at a time,
/// left-padded, as [`exact_match`] generates them; each row's loss is computed on the row alone.
///
/// # Errors
///
/// A row the model cannot take (too long for its context).
pub fn predict<M: CausalLm, A: Adapter>(
    model: &PeftModel<M, A>,
    rows: &[TokenizedExample],
    options: &EvalOptions,
    mut each: impl FnMut(&TokenizedExample, Prediction) -> ControlFlow<()>,
) -> Result<(), CoreError> {
    let device = model.base.device();
    let virtual_tokens = model.adapter.num_virtual_tokens();
    for chunk in rows.chunks(options.batch_size.max(1)) {
        let completions: Vec<&TokenizedExample> = chunk
            .iter()
            .filter(|r| options.exact_match && r.is_completion())
            .collect();
        let mut generated = if completions.is_empty() {
            Vec::new()
        } else {
            let prompts: Vec<Vec<u32>> = completions
                .iter()
                .map(|r| r.prompt_ids().to_vec())
                .collect();
            let longest = completions
                .iter()
                .map(|r| r.target_ids().len())
                .max()
                .unwrap_or(1);
            let config = GenerationConfig::new()
                .with_max_new_tokens(longest)
                .with_eos_token_ids(options.eos_token_ids.clone())
                .with_pad_token_id(options.pad_token_id);
            model
                .generate(&prompts, &config, |_| ControlFlow::Continue(()))?
                .new_tokens
        }
        .into_iter();
        for row in chunk {
            let batch = Batch::collate(&[row], options.pad_token_id, virtual_tokens, &device);
            let loss: f32 = model
                .loss(batch.input_ids, None, batch.labels)
                .into_scalar();
            let generated = (options.exact_match && row.is_completion())
                .then(|| generated.next())
                .flatten();
            let exact_match = generated.as_ref().map(|g| g.starts_with(row.target_ids()));
            let prediction = Prediction {
                loss: f64::from(loss),
                scored: batch.scored,
                generated,
                exact_match,
            };
            if each(row, prediction).is_break() {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_transformers_linear_warmup() {
        // get_linear_schedule_with_warmup(opt, 2, 10) with lr 1.0, steps 0..10.
        let lrs: Vec<f64> = (0..10).map(|s| linear_schedule(1.0, s, 2, 10)).collect();
        let expected = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (got, want) in lrs.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{lrs:?}");
        }
        assert_eq!(linear_schedule(1.0, 0, 0, 4), 1.0);
        assert_eq!(linear_schedule(1.0, 3, 0, 4), 0.25);
    }
}
