//! The string tasks of the embedded default model: a word of lowercase letters in, a string out.
//!
//! `cargo xtask pretrain` trains the tiny Qwen2 in `assets/tiny-qwen2` on all of them, each
//! introduced by its name ("reverse: abcd -> dcba"); the quickstart then asks each method to
//! learn one of them from examples alone ("abcd -> dcba"), with no instruction text, so the
//! adapter has to carry what the instruction said.

use rand::{Rng, RngExt};

/// A task: its instruction word and what it does to a word.
#[derive(Debug, Clone, Copy)]
pub struct Task {
    /// The instruction word that introduces the task in pretraining.
    pub name: &'static str,
    /// The answer for a word.
    pub apply: fn(&str) -> String,
}

fn reverse(w: &str) -> String {
    w.chars().rev().collect()
}

fn sort(w: &str) -> String {
    let mut c: Vec<char> = w.chars().collect();
    c.sort_unstable();
    c.into_iter().collect()
}

fn upper(w: &str) -> String {
    w.to_ascii_uppercase()
}

fn double(w: &str) -> String {
    w.chars().flat_map(|c| [c, c]).collect()
}

fn rotate(w: &str) -> String {
    let mut c: Vec<char> = w.chars().collect();
    c.rotate_left(1);
    c.into_iter().collect()
}

fn next(w: &str) -> String {
    w.bytes()
        .map(|b| char::from(b'a' + (b - b'a' + 1) % 26))
        .collect()
}

fn copy(w: &str) -> String {
    w.to_string()
}

fn first_last(w: &str) -> String {
    let c: Vec<char> = w.chars().collect();
    [c[0], c[c.len() - 1]].iter().collect()
}

fn length(w: &str) -> String {
    w.len().to_string()
}

fn swap_ends(w: &str) -> String {
    let mut c: Vec<char> = w.chars().collect();
    let n = c.len();
    c.swap(0, n - 1);
    c.into_iter().collect()
}

/// Every task, in a fixed order.
pub const TASKS: [Task; 10] = [
    Task {
        name: "reverse",
        apply: reverse,
    },
    Task {
        name: "sort",
        apply: sort,
    },
    Task {
        name: "upper",
        apply: upper,
    },
    Task {
        name: "double",
        apply: double,
    },
    Task {
        name: "rotate",
        apply: rotate,
    },
    Task {
        name: "next",
        apply: next,
    },
    Task {
        name: "copy",
        apply: copy,
    },
    Task {
        name: "ends",
        apply: first_last,
    },
    Task {
        name: "length",
        apply: length,
    },
    Task {
        name: "swap",
        apply: swap_ends,
    },
];

/// The task named `name`.
pub fn task(name: &str) -> Option<Task> {
    TASKS.iter().copied().find(|t| t.name == name)
}

/// Shortest and longest words.
pub const WORD_LENGTHS: std::ops::RangeInclusive<usize> = 3..=6;

/// A random word of lowercase letters.
pub fn random_word(rng: &mut impl Rng) -> String {
    let len = rng.random_range(WORD_LENGTHS);
    (0..len)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// The prompt of a word without instruction: `"{word} -> "`.
pub fn bare_prompt(word: &str) -> String {
    format!("{word} -> ")
}

/// The prompt of a word with its task's instruction: `"{task}: {word} -> "`.
pub fn instructed_prompt(task: &Task, word: &str) -> String {
    format!("{}: {}", task.name, bare_prompt(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_do_what_their_names_say() {
        let answers: Vec<String> = TASKS.iter().map(|t| (t.apply)("stack")).collect();
        assert_eq!(
            answers,
            [
                "kcats",
                "ackst",
                "STACK",
                "ssttaacckk",
                "tacks",
                "tubdl",
                "stack",
                "sk",
                "5",
                "ktacs"
            ]
        );
        assert_eq!(next("zoo"), "app");
        assert_eq!(instructed_prompt(&TASKS[0], "abc"), "reverse: abc -> ");
    }
}
