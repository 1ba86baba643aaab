//! Training checkpoints: a directory `checkpoint-{step}` holding the adapter (its trainable
//! form), the optimizer state and the trainer state, never the frozen base.
//!
//! A checkpoint is written into a hidden `.checkpoint-{step}.partial` directory and renamed into
//! place only when complete, so a crash mid-write leaves the previous checkpoint as the latest
//! valid one; older checkpoints are removed after the rename.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File of the optimizer state inside a checkpoint.
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";
/// File of the trainer state inside a checkpoint (written last).
pub const TRAINER_STATE: &str = "trainer_state.json";

const PREFIX: &str = "checkpoint-";

/// Where a run stands: enough to continue it with the same data order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Epoch the next step belongs to (0-based).
    pub epoch: usize,
    /// Optimizer steps already taken within that epoch.
    pub step_in_epoch: usize,
    /// Seed of the data order (and dropout).
    pub seed: u64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Rows batched by length ([`crate::data::length_grouped_order`]).
    #[serde(default)]
    pub group_by_length: bool,
    /// Data-parallel replicas (each takes `batch_size` rows of every micro-batch); checkpoints
    /// made before data parallelism had one.
    #[serde(default = "one_device")]
    pub devices: usize,
    /// Training rows.
    pub train_rows: usize,
    /// Hash of the training rows' tokens and labels, to refuse resuming on other data.
    pub train_fingerprint: String,
}

fn one_device() -> usize {
    1
}

/// Why a checkpoint cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The system error.
        source: std::io::Error,
    },
    /// The trainer state is unreadable or belongs to another run.
    #[error("{path}: {message}")]
    State {
        /// The trainer-state file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The newest complete checkpoint under `output_dir`: `(step, directory)`.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<(usize, PathBuf)>, CheckpointError> {
    Ok(checkpoints(output_dir)?
        .into_iter()
        .max_by_key(|(step, _)| *step))
}

fn checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(output_dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(output_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<usize>().ok())
            && entry.path().join(TRAINER_STATE).is_file()
        {
            found.push((step, entry.path()));
        }
    }
    Ok(found)
}

/// Writes checkpoint `step` under `output_dir`: `fill` writes the files into a fresh hidden
/// directory, which is then renamed to `checkpoint-{step}`; the trainer state goes in last.
/// Once the new one is in place, the oldest others are removed so that `keep` remain, the new
/// one included (`None`: none are removed). If `fill` fails, nothing changes but the hidden
/// directory being removed.
pub fn write_checkpoint<E: From<CheckpointError>>(
    output_dir: &Path,
    step: usize,
    state: &TrainerState,
    keep: Option<usize>,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<PathBuf, E> {
    let partial = output_dir.join(format!(".{PREFIX}{step}.partial"));
    let target = output_dir.join(format!("{PREFIX}{step}"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let filled = fill(&partial).and_then(|()| {
        let json = serde_json::to_string_pretty(state).expect("trainer state serializes");
        peft_core::adapter_file::write_atomic(&partial.join(TRAINER_STATE), json.as_bytes())
            .map_err(io(&partial.join(TRAINER_STATE)))?;
        Ok(())
    });
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if target.exists() {
        // Rewriting the same step (a resumed run): move the old one aside first, so one complete
        // copy exists at every moment.
        let aside = output_dir.join(format!(".{PREFIX}{step}.old"));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&target, &aside).map_err(io(&target))?;
        std::fs::rename(&partial, &target).map_err(io(&target))?;
        let _ = std::fs::remove_dir_all(&aside);
    } else {
        std::fs::rename(&partial, &target).map_err(io(&target))?;
    }
    if let Some(keep) = keep {
        let mut others: Vec<(usize, PathBuf)> = checkpoints(output_dir)?
            .into_iter()
            .filter(|(old, _)| *old != step)
            .collect();
        others.sort_by_key(|(old, _)| std::cmp::Reverse(*old));
        for (_, dir) in others.into_iter().skip(keep.saturating_sub(1)) {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
    }
    Ok(target)
}

/// Reads the trainer state of checkpoint directory `dir`.
pub fn read_trainer_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::State {
        path,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainerState {
        TrainerState {
            global_step: step,
            epoch: 0,
            step_in_epoch: step,
            seed: 1,
            batch_size: 2,
            gradient_accumulation_steps: 1,
            group_by_length: false,
            devices: 1,
            train_rows: 4,
            train_fingerprint: "0".into(),
        }
    }

    #[test]
    fn a_crash_mid_write_leaves_the_previous_checkpoint_the_latest() {
        let out = std::env::temp_dir().join(format!("peft-core-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let write = |dir: &Path| -> Result<(), CheckpointError> {
            std::fs::write(dir.join("weights"), b"step").map_err(io(dir))
        };
        write_checkpoint(&out, 2, &state(2), Some(1), write).unwrap();
        let (step, dir) = latest_checkpoint(&out).unwrap().unwrap();
        assert_eq!(step, 2);
        assert_eq!(read_trainer_state(&dir).unwrap(), state(2));

        // Step 4's writer fails halfway: step 2 stays the latest, whole, and nothing of 4 is left.
        let failing = |dir: &Path| -> Result<(), CheckpointError> {
            std::fs::write(dir.join("weights"), b"half").map_err(io(dir))?;
            Err(io(dir)(std::io::Error::other("disk full")))
        };
        assert!(write_checkpoint(&out, 4, &state(4), Some(1), failing).is_err());
        let (step, dir) = latest_checkpoint(&out).unwrap().unwrap();
        assert_eq!(step, 2);
        assert_eq!(std::fs::read(dir.join("weights")).unwrap(), b"step");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

        // A process killed mid-write leaves a partial directory (no trainer state): ignored.
        std::fs::create_dir_all(out.join(".checkpoint-6.partial")).unwrap();
        std::fs::create_dir_all(out.join("checkpoint-8")).unwrap();
        assert_eq!(latest_checkpoint(&out).unwrap().unwrap().0, 2);

        // The next good checkpoint replaces the old one.
        std::fs::remove_dir_all(out.join("checkpoint-8")).unwrap();
        write_checkpoint(&out, 6, &state(6), Some(1), write).unwrap();
        assert_eq!(latest_checkpoint(&out).unwrap().unwrap().0, 6);
        assert!(!out.join("checkpoint-2").exists());
        assert!(!out.join(".checkpoint-6.partial").exists());
        // Rewriting the same step keeps one complete copy.
        write_checkpoint(&out, 6, &state(6), Some(1), write).unwrap();
        assert_eq!(latest_checkpoint(&out).unwrap().unwrap().0, 6);
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn checkpoints_beyond_the_limit_go_oldest_first() {
        let out = std::env::temp_dir().join(format!("peft-core-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let write = |dir: &Path| -> Result<(), CheckpointError> {
            std::fs::write(dir.join("weights"), b"step").map_err(io(dir))
        };
        let steps = |out: &Path| {
            let mut found: Vec<usize> = checkpoints(out)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            found.sort();
            found
        };
        for step in [1, 2, 3, 4] {
            write_checkpoint(&out, step, &state(step), Some(2), write).unwrap();
        }
        assert_eq!(steps(&out), [3, 4]);
        // Without a limit nothing is removed.
        for step in [5, 6] {
            write_checkpoint(&out, step, &state(step), None, write).unwrap();
        }
        assert_eq!(steps(&out), [3, 4, 5, 6]);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
