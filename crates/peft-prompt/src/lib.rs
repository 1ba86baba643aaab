//! Prompt Tuning (PEFT `PROMPT_TUNING`) for peft-burn.
//!
//! Not implemented yet: the method arrives with the adapter issue. The crate exists so the
//! workspace has its final shape and the facade can re-export it.
#![warn(missing_docs)]
