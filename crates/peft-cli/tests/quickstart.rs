//! The README's main command: `peft quickstart` on the embedded model. Every method must learn
//! the task from examples alone: training loss falls and held-out exact match rises clearly
//! above the untrained adapter's.

use peft_cli::quickstart::{QuickstartArgs, quickstart};

#[test]
fn every_method_learns_the_quickstart_task() {
    let output = std::env::temp_dir().join(format!("peft-quickstart-{}", std::process::id()));
    let args = QuickstartArgs {
        model: None,
        task: "sort".into(),
        output: output.clone(),
        methods: Vec::new(),
        train_rows: 640,
        eval_rows: 100,
        epochs: 4,
        seed: 0,
        lr: None,
    };
    let mut printed = Vec::new();
    let results = quickstart(&args, &burn::prelude::Device::default(), &mut printed).unwrap();
    let printed = String::from_utf8(printed).unwrap();
    assert_eq!(results.len(), 5, "{printed}");
    let methods: Vec<&str> = results.iter().map(|r| r.method.preset.name).collect();
    assert_eq!(
        methods,
        [
            "prompt-tuning",
            "p-tuning",
            "prefix-tuning",
            "p-tuning-v2",
            "bitfit"
        ]
    );
    for r in &results {
        let name = r.method.preset.name;
        assert!(
            r.train_loss.1 < r.train_loss.0,
            "{name}: training loss did not fall\n{printed}"
        );
        assert!(
            r.loss.1 < r.loss.0,
            "{name}: held-out loss did not fall\n{printed}"
        );
        assert!(
            r.accuracy_after >= r.accuracy_before + MIN_GAIN,
            "{name}: exact match {:.2} -> {:.2}\n{printed}",
            r.accuracy_before,
            r.accuracy_after
        );
    }
    assert!(printed.contains("| method "), "{printed}");
    std::fs::remove_dir_all(output).unwrap();
}

/// The gain every method must show (fraction of held-out rows).
const MIN_GAIN: f64 = 0.25;

#[test]
fn bad_flags_or_a_bad_model_leave_no_files() {
    let output = std::env::temp_dir().join(format!("peft-quickstart-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&output);
    let args = QuickstartArgs {
        model: None,
        task: "sort".into(),
        output: output.clone(),
        methods: Vec::new(),
        train_rows: 16,
        eval_rows: 4,
        epochs: 1,
        seed: 0,
        lr: Some(f64::NAN),
    };
    let device = burn::prelude::Device::default();
    let err = quickstart(&args, &device, &mut Vec::new()).err().unwrap();
    assert_eq!(
        err.to_string(),
        "--lr: must be a finite number >= 0, found NaN"
    );
    assert!(!output.exists(), "{} was written", output.display());
    let missing = std::env::temp_dir().join("peft-quickstart-no-such-model");
    let args = QuickstartArgs {
        model: Some(missing.clone()),
        lr: None,
        ..args
    };
    let err = quickstart(&args, &device, &mut Vec::new()).err().unwrap();
    assert!(err.to_string().contains("no-such-model"), "{err}");
    assert!(!output.exists(), "{} was written", output.display());
}
