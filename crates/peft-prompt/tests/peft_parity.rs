//! Prompt tuning against PEFT 0.21.2: PEFT's own adapter file, the same batch, the same logits,
//! loss and SGD step (fixtures from `scripts/make_adapter_fixtures.py`).

use std::path::PathBuf;

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use peft_core::{BaseShape, Method, PeftModel};
use peft_models::AutoCausalLm;
use peft_prompt::PromptEmbedding;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

struct Tensors(Vec<u8>);

impl Tensors {
    fn read(path: PathBuf) -> Self {
        Self(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn get(&self, name: &str) -> (Vec<usize>, Vec<u8>, safetensors::Dtype) {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().to_vec(), t.dtype())
    }

    fn floats<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let (shape, bytes, dtype) = self.get(name);
        assert_eq!(dtype, safetensors::Dtype::F32, "{name}");
        Tensor::from_data(TensorData::from_bytes_vec(bytes, shape, DType::F32), device)
    }

    fn ints(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        let (shape, bytes, dtype) = self.get(name);
        assert_eq!(dtype, safetensors::Dtype::I64, "{name}");
        Tensor::from_data(TensorData::from_bytes_vec(bytes, shape, DType::I64), device)
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

#[test]
fn prompt_tuning_matches_peft_forward_loss_and_sgd_step() {
    for model in ["qwen2-gqa-tied", "llama-mqa-sharded", "bloom-6-heads"] {
        let device = Device::default().autodiff();
        let expected = Tensors::read(fixtures().join(format!(
            "expected/adapters/{model}-prompt-tuning.safetensors"
        )));

        let base = AutoCausalLm::from_pretrained(
            fixtures().join("models").join(model),
            &device,
            DType::F32,
        )
        .unwrap();
        let adapter_dir = fixtures().join(format!("adapters/{model}/prompt-tuning"));
        let shape = BaseShape::of(&base);
        let prompt = PromptEmbedding::read(&adapter_dir, &shape, &device).unwrap();
        let peft = PeftModel::new(base, prompt);

        let ids = expected.ints("input_ids", &device);
        let mask = expected.ints("attention_mask", &device);
        let labels = expected.ints("labels", &device);

        // Logits of the real (unpadded) tokens.
        let ours = values(peft.forward(ids.clone(), Some(mask.clone())));
        let theirs = values(expected.floats::<3>("logits", &device));
        let real: Vec<i64> = mask.clone().into_data().try_into_vec_as().unwrap();
        let vocab = ours.len() / real.len();
        let diff = real
            .iter()
            .enumerate()
            .filter(|(_, m)| **m == 1)
            .flat_map(|(i, _)| (i * vocab..(i + 1) * vocab).map(|j| (ours[j] - theirs[j]).abs()))
            .fold(0.0f32, f32::max);
        eprintln!("{model}: logits max diff {diff:e}");
        assert!(diff <= 1e-4, "{model}: logits differ from PEFT by {diff}");

        // Loss, then one plain SGD step (lr 0.1) on the prompt.
        let loss = peft.loss(ids, Some(mask), labels);
        let ours_loss = values(loss.clone())[0];
        let theirs_loss = values(expected.floats::<1>("loss", &device))[0];
        eprintln!("{model}: loss {ours_loss} vs PEFT {theirs_loss}");
        assert!(
            (ours_loss - theirs_loss).abs() <= 1e-5,
            "{model}: loss {ours_loss} vs {theirs_loss}"
        );

        let grads = loss.backward();
        let weight = peft.adapter.embedding.weight.val();
        let grad = weight.grad(&grads).expect("the prompt is trainable");
        let before = values(weight.clone().inner());
        let stepped = values(weight.inner() - grad * 0.1);
        let theirs = values(expected.floats::<2>("prompt_embeddings_after_sgd", &device));
        let moved = before
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            moved > 1e-3,
            "{model}: PEFT's step barely moved the prompt ({moved}); the check would be vacuous"
        );
        let diff = stepped
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{model}: SGD step max diff {diff:e}");
        assert!(
            diff <= 1e-5,
            "{model}: updated prompt differs from PEFT by {diff}"
        );

        // Only the prompt received a gradient: the base is frozen.
        let trainable = GradientsParams::from_grads(grads, &peft);
        assert_eq!(trainable.len(), 1, "{model}: only the prompt trains");

        // Saved in PEFT's format, it loads back bit-identical.
        let tmp = std::env::temp_dir().join(format!("peft-prompt-{model}-{}", std::process::id()));
        peft.adapter
            .write(&tmp, &shape, Some("fixtures/models"))
            .unwrap();
        let again = PromptEmbedding::read(&tmp, &shape, &device).unwrap();
        assert_eq!(
            again.prompt_embeddings().into_data(),
            peft.adapter.prompt_embeddings().into_data()
        );
        let saved: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let peft_config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for key in [
            "peft_type",
            "task_type",
            "num_virtual_tokens",
            "token_dim",
            "num_attention_heads",
            "num_layers",
            "num_transformer_submodules",
            "prompt_tuning_init",
        ] {
            assert_eq!(
                saved[key], peft_config[key],
                "{model}: `{key}` as PEFT writes it"
            );
        }
        std::fs::remove_dir_all(tmp).unwrap();
    }
}
