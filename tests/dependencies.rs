//! The facade library pulls in none of the command line's dependencies: a Rust user of `peft`
//! compiles no clap, indicatif or png (issue 19).

use std::process::Command;

#[test]
fn the_library_has_no_cli_dependencies() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--manifest-path",
            manifest,
            "-p",
            "peft",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("runs cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(tree.contains("burn v0.22.1"), "{tree}");
    for crate_name in ["clap", "indicatif", "png"] {
        let found: Vec<&str> = tree
            .lines()
            .filter(|line| line.starts_with(&format!("{crate_name} v")))
            .collect();
        assert!(found.is_empty(), "peft depends on {found:?}");
    }
}
