//! The engine on a thread of its own: the HTTP handlers submit requests through a bounded
//! channel and read their tokens from a channel per request; a request whose reader is gone (the
//! client disconnected, or stopped reading at a stop string) is cancelled before the next step.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use peft::core::CausalLm;
use tokio::sync::{mpsc, oneshot};

use crate::{Engine, EngineError, Event, Request};

/// What a request's reader receives.
#[derive(Debug)]
pub enum Update {
    /// The next token.
    Token(u32),
    /// The request produced its EOS or `max_new_tokens`.
    Done,
    /// The engine failed while this request ran (the message says why); the request is dropped.
    Failed(String),
}

/// A request for the engine thread, with where its tokens go and where its admission is answered.
pub struct Submission {
    /// The request.
    pub request: Request,
    /// Its tokens.
    pub updates: mpsc::UnboundedSender<Update>,
    /// Admission: `Ok` once queued, or why not.
    pub admitted: oneshot::Sender<Result<(), EngineError>>,
}

/// Counters the engine thread keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests waiting for a row.
    pub queued: AtomicU64,
    /// Rows decoding.
    pub running: AtomicU64,
    /// Tokens generated since the start.
    pub tokens_generated: AtomicU64,
    /// Requests that finished (EOS or length).
    pub requests_finished: AtomicU64,
    /// Requests cancelled because their client went away.
    pub requests_cancelled: AtomicU64,
    /// Engine steps that failed (every request then running was answered with an error).
    pub engine_failures: AtomicU64,
}

/// Runs `engine` until every sender of `submissions` is gone and nothing is left to decode.
pub fn run<M: CausalLm>(
    mut engine: Engine<M>,
    submissions: Receiver<Submission>,
    metrics: Arc<Metrics>,
) {
    let mut readers: HashMap<u64, mpsc::UnboundedSender<Update>> = HashMap::new();
    let mut open = true;
    loop {
        // Idle: wait for work (waking now and then to notice a reader gone from the queue).
        if engine.is_idle() {
            if !open {
                return;
            }
            match submissions.recv_timeout(Duration::from_millis(200)) {
                Ok(submission) => admit(&mut engine, &mut readers, submission),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // Join whatever else arrived while the last step ran.
        loop {
            match submissions.try_recv() {
                Ok(submission) => admit(&mut engine, &mut readers, submission),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let gone: Vec<u64> = readers
            .iter()
            .filter(|(_, reader)| reader.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            engine.cancel(id);
            readers.remove(&id);
            metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        }
        if !engine.is_idle() {
            // A failing step must not take the server down: its requests get the error, the
            // engine drops them, and the next requests start on an empty batch.
            match std::panic::catch_unwind(AssertUnwindSafe(|| engine.step())) {
                Ok(events) => {
                    for event in events {
                        deliver(&mut engine, &mut readers, &metrics, event);
                    }
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("the engine failed")
                        .to_string();
                    metrics.engine_failures.fetch_add(1, Ordering::Relaxed);
                    for (id, reader) in readers.drain() {
                        engine.cancel(id);
                        let _ = reader.send(Update::Failed(message.clone()));
                    }
                }
            }
        }
        metrics
            .queued
            .store(engine.queued() as u64, Ordering::Relaxed);
        metrics
            .running
            .store(engine.running() as u64, Ordering::Relaxed);
    }
}

fn admit<M: CausalLm>(
    engine: &mut Engine<M>,
    readers: &mut HashMap<u64, mpsc::UnboundedSender<Update>>,
    submission: Submission,
) {
    let Submission {
        request,
        updates,
        admitted,
    } = submission;
    let id = request.id;
    let answer = engine.submit(request);
    if answer.is_ok() {
        readers.insert(id, updates);
    }
    // The handler may be gone already; its request then leaves at the next reader check.
    let _ = admitted.send(answer);
}

fn deliver<M: CausalLm>(
    engine: &mut Engine<M>,
    readers: &mut HashMap<u64, mpsc::UnboundedSender<Update>>,
    metrics: &Metrics,
    event: Event,
) {
    match event {
        Event::Token { id, token, .. } => {
            metrics.tokens_generated.fetch_add(1, Ordering::Relaxed);
            let delivered = readers
                .get(&id)
                .is_some_and(|reader| reader.send(Update::Token(token)).is_ok());
            if !delivered && readers.remove(&id).is_some() {
                engine.cancel(id);
                metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        Event::Finished { id, .. } => {
            metrics.requests_finished.fetch_add(1, Ordering::Relaxed);
            if let Some(reader) = readers.remove(&id) {
                let _ = reader.send(Update::Done);
            }
        }
    }
}
