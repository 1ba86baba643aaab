//! The batch scheduler: a queue of requests, a running batch with one KV cache, one decode step
//! at a time.

use std::collections::VecDeque;
use std::sync::Arc;

use burn::prelude::*;
use peft::AutoAdapter;
use peft::core::{
    Adapter, BiasDeltas, CausalLm, CoreError, GenerationConfig, Injection, KvCache, ModelInput,
    TokenSampler,
};

/// A generation request: `prompt` continued with `adapter` (or the bare base) as `config` says
/// (`max_new_tokens`, `eos_token_ids`, greedy or sampled with its own seed; `pad_token_id` is
/// unused: rows are never padded with tokens).
#[derive(Debug, Clone)]
pub struct Request {
    /// The caller's id, echoed in every [`Event`].
    pub id: u64,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// The adapter of this row, in its inference form; `None` serves the base model.
    pub adapter: Option<Arc<AutoAdapter>>,
    /// How to decode.
    pub config: GenerationConfig,
}

/// What one [`Engine::step`] produced for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token of request `id`.
    Token {
        /// The request.
        id: u64,
        /// The token.
        token: u32,
        /// The logits it was chosen from (f32, one per vocabulary entry), when the engine keeps
        /// them ([`Engine::with_logits`]).
        logits: Option<Vec<f32>>,
    },
    /// Request `id` is done: it produced an EOS or its `max_new_tokens`.
    Finished {
        /// The request.
        id: u64,
        /// Every token it produced.
        tokens: Vec<u32>,
    },
}

/// Why a request cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The queue holds `max_queue` requests already.
    #[error("the queue is full ({max_queue} requests waiting)")]
    QueueFull {
        /// The queue's bound.
        max_queue: usize,
    },
    /// The request does not fit the model (empty prompt, token outside the vocabulary, longer
    /// than the context once its adapter's tokens and `max_new_tokens` are added).
    #[error("request {id}: {source}")]
    Invalid {
        /// The request.
        id: u64,
        /// What is wrong.
        source: CoreError,
    },
    /// The request's adapter changes the base's weights in a way a row cannot carry (only bias
    /// deltas can be).
    #[error("request {id}: its {peft_type} adapter cannot share a batch: {reason}")]
    Unservable {
        /// The request.
        id: u64,
        /// The adapter's method.
        peft_type: &'static str,
        /// Why.
        reason: String,
    },
}

/// A running row.
struct Row {
    request: Request,
    /// The row's bias deltas (`[1, size]` each), for an adapter that trains the base's biases.
    biases: Option<BiasDeltas>,
    tokens: Vec<u32>,
    /// The token to feed at the next decode step.
    next: u32,
    /// The logits `next` was chosen from, when kept.
    next_logits: Option<Vec<f32>>,
    /// The row's own choices (its sampling stream).
    sampler: TokenSampler,
}

/// One base model serving requests of many adapters in shared batches.
pub struct Engine<M: CausalLm> {
    model: M,
    max_batch_size: usize,
    max_queue: usize,
    queue: VecDeque<(Request, Option<BiasDeltas>)>,
    rows: Vec<Row>,
    cache: Option<KvCache>,
    /// The running rows' bias deltas stacked (`None`: no row has any); rebuilt when rows change.
    batch_biases: Option<BiasDeltas>,
    keep_logits: bool,
}

impl<M: CausalLm> Engine<M> {
    /// An engine over `model` running at most `max_batch_size` rows at once and queueing at most
    /// `max_queue` more (both at least 1).
    pub fn new(model: M, max_batch_size: usize, max_queue: usize) -> Self {
        Self {
            model,
            max_batch_size: max_batch_size.max(1),
            max_queue: max_queue.max(1),
            queue: VecDeque::new(),
            rows: Vec::new(),
            cache: None,
            batch_biases: None,
            keep_logits: false,
        }
    }

    /// Whether [`Event::Token`]s carry the logits each token was chosen from (a vocabulary of
    /// f32 per token: for log-probabilities, and for tests that compare rows with their requests
    /// served alone).
    pub fn with_logits(mut self, keep: bool) -> Self {
        self.keep_logits = keep;
        self
    }

    /// Queues `request`; it joins the running batch at the next [`Engine::step`] with room.
    ///
    /// # Errors
    ///
    /// A full queue, or a request that does not fit the model (checked now, not when it runs).
    pub fn submit(&mut self, request: Request) -> Result<(), EngineError> {
        if self.queue.len() >= self.max_queue {
            return Err(EngineError::QueueFull {
                max_queue: self.max_queue,
            });
        }
        let extra = request.adapter.as_ref().map_or(0, |a| a.added_positions())
            + request.config.max_new_tokens;
        let ids: Vec<i64> = request.prompt.iter().map(|&t| i64::from(t)).collect();
        let problem = if request.prompt.is_empty() {
            Some(CoreError::Shape {
                what: "prompt",
                message: "needs at least one token".into(),
            })
        } else if request.config.max_new_tokens == 0 {
            Some(CoreError::Shape {
                what: "max_new_tokens",
                message: "must be at least 1".into(),
            })
        } else {
            request
                .config
                .validate()
                .err()
                .or_else(|| self.model.check_input(&[ids], None, extra).err())
        };
        if let Some(source) = problem {
            return Err(EngineError::Invalid {
                id: request.id,
                source,
            });
        }
        // An adapter that trains the base's biases is served as per-row deltas of them.
        let biases = match &request.adapter {
            Some(adapter) if adapter.changes_base_weights() => {
                match adapter.bias_deltas(&self.model) {
                    Some(deltas) => Some(deltas),
                    None => {
                        return Err(EngineError::Unservable {
                            id: request.id,
                            peft_type: adapter.peft_type(),
                            reason: "it changes base weights other than biases, or holds no \
                                     trained values"
                                .into(),
                        });
                    }
                }
            }
            _ => None,
        };
        self.queue.push_back((request, biases));
        Ok(())
    }

    /// Rows decoding now.
    pub fn running(&self) -> usize {
        self.rows.len()
    }

    /// Requests waiting for room.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is running or waiting.
    pub fn is_idle(&self) -> bool {
        self.rows.is_empty() && self.queue.is_empty()
    }

    /// Drops request `id` wherever it is (a client that went away frees its row).
    pub fn cancel(&mut self, id: u64) {
        self.queue.retain(|(r, _)| r.id != id);
        if let Some(at) = self.rows.iter().position(|r| r.request.id == id) {
            self.remove_rows(&[at]);
        }
    }

    /// One step: queued requests join while there is room (prefilled together in groups of
    /// similar length, their caches joined to the batch's), then every running row decodes one
    /// token. Returns the tokens and the requests that finished.
    pub fn step(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        // Join: a new row's prefill yields its first token.
        let mut joining = Vec::new();
        while self.rows.len() + joining.len() < self.max_batch_size {
            let Some(entry) = self.queue.pop_front() else {
                break;
            };
            joining.push(entry);
        }
        let joined = !joining.is_empty();
        for group in prefill_groups(joining) {
            let (cache, firsts) = self.prefill(&group);
            self.cache = Some(match self.cache.take() {
                Some(running) => KvCache::join_rows(vec![running, cache]),
                None => cache,
            });
            for ((request, biases), (token, logits, sampler)) in group.into_iter().zip(firsts) {
                self.rows.push(Row {
                    tokens: Vec::new(),
                    next: token,
                    next_logits: self.keep_logits.then_some(logits),
                    request,
                    biases,
                    sampler,
                });
            }
            // The first tokens are emitted below with the others, so that a row's tokens come
            // out in order, one per step.
        }
        if joined {
            self.stack_biases();
        }
        if self.rows.is_empty() {
            return events;
        }
        // Emit each row's pending token; rows that finish leave before the decode.
        let mut done = Vec::new();
        for (at, row) in self.rows.iter_mut().enumerate() {
            let token = row.next;
            row.tokens.push(token);
            events.push(Event::Token {
                id: row.request.id,
                token,
                logits: row.next_logits.take(),
            });
            if row.request.config.eos_token_ids.contains(&token)
                || row.tokens.len() >= row.request.config.max_new_tokens
            {
                events.push(Event::Finished {
                    id: row.request.id,
                    tokens: row.tokens.clone(),
                });
                done.push(at);
            }
        }
        self.remove_rows(&done);
        if self.rows.is_empty() {
            return events;
        }
        // Decode: every running row's pending token through the model.
        let device = self.model.device();
        let batch = self.rows.len();
        let next: Vec<i64> = self.rows.iter().map(|r| i64::from(r.next)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(next, [batch, 1]), &device);
        let input = ModelInput::new(self.model.embed_tokens(ids))
            .with_cache(self.cache.take())
            .with_bias_deltas(self.batch_biases.clone());
        let out = self.model.forward_hidden(input);
        let logits = last_logits(&self.model, out.hidden_states);
        self.cache = Some(out.cache);
        let vocab = self.model.geometry().vocab_size;
        for (i, row) in self.rows.iter_mut().enumerate() {
            let own = &logits[i * vocab..(i + 1) * vocab];
            row.next = row.sampler.choose(own);
            row.next_logits = self.keep_logits.then(|| own.to_vec());
        }
        events
    }

    /// Prefills `group` as one batch (prompts left-padded, each row with its adapter's
    /// injection and bias deltas): its cache, and for each row its first token, the logits it was
    /// chosen from and its sampler. Positions are padding-aware, so each row gets what it gets
    /// alone.
    fn prefill(
        &self,
        group: &[(Request, Option<BiasDeltas>)],
    ) -> (KvCache, Vec<(u32, Vec<f32>, TokenSampler)>) {
        let device = self.model.device();
        let longest = group.iter().map(|(r, _)| r.prompt.len()).max().unwrap_or(0);
        let rows = group.len();
        let mut ids = Vec::with_capacity(rows * longest);
        let mut mask = Vec::with_capacity(rows * longest);
        for (request, _) in group {
            let pad = longest - request.prompt.len();
            ids.extend(std::iter::repeat_n(0i64, pad));
            ids.extend(request.prompt.iter().map(|&t| i64::from(t)));
            mask.extend(std::iter::repeat_n(0i64, pad));
            mask.extend(std::iter::repeat_n(1i64, request.prompt.len()));
        }
        let padded = mask.contains(&0);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, longest]), &device);
        let mask = padded
            .then(|| Tensor::<2, Int>::from_data(TensorData::new(mask, [rows, longest]), &device));
        let injection = Injection::stack(
            group
                .iter()
                .map(|(r, _)| {
                    r.adapter
                        .as_ref()
                        .map_or_else(Injection::default, |a| a.inject(1))
                })
                .collect(),
        );
        let deltas: Vec<Option<&BiasDeltas>> = group.iter().map(|(_, d)| d.as_ref()).collect();
        let input = injection
            .into_input(self.model.embed_tokens(ids), mask)
            .with_bias_deltas(BiasDeltas::stack(&deltas, &device));
        let out = self.model.forward_hidden(input);
        let logits = last_logits(&self.model, out.hidden_states);
        let vocab = self.model.geometry().vocab_size;
        let firsts = group
            .iter()
            .enumerate()
            .map(|(i, (request, _))| {
                let own = logits[i * vocab..(i + 1) * vocab].to_vec();
                let mut sampler = TokenSampler::new(&request.config);
                (sampler.choose(&own), own, sampler)
            })
            .collect();
        (out.cache, firsts)
    }

    fn remove_rows(&mut self, rows: &[usize]) {
        if rows.is_empty() {
            return;
        }
        let keep: Vec<usize> = (0..self.rows.len()).filter(|r| !rows.contains(r)).collect();
        self.cache = if keep.is_empty() {
            None
        } else {
            self.cache.take().map(|c| c.select_rows(&keep))
        };
        let mut at = 0;
        self.rows.retain(|_| {
            let kept = keep.contains(&at);
            at += 1;
            kept
        });
        self.stack_biases();
    }

    /// Rebuilds the batch's bias deltas from its rows'.
    fn stack_biases(&mut self) {
        let rows: Vec<Option<&BiasDeltas>> = self.rows.iter().map(|r| r.biases.as_ref()).collect();
        self.batch_biases = BiasDeltas::stack(&rows, &self.model.device());
    }
}

/// Rows that join together, in groups prefilled as one batch each: sorted by the length their
/// prefill computes (prompt and virtual tokens), a group closes when one more row would make its
/// left padding more than a quarter of its real tokens, or at 16 rows. One long row among short
/// ones is thus prefilled alone rather than padding the others.
fn prefill_groups(
    mut joining: Vec<(Request, Option<BiasDeltas>)>,
) -> Vec<Vec<(Request, Option<BiasDeltas>)>> {
    const MOST_ROWS: usize = 16;
    let length = |(r, _): &(Request, Option<BiasDeltas>)| {
        r.prompt.len() + r.adapter.as_ref().map_or(0, |a| a.num_virtual_tokens())
    };
    joining.sort_by_key(length);
    let mut groups: Vec<Vec<(Request, Option<BiasDeltas>)>> = Vec::new();
    let mut real = 0;
    for entry in joining {
        let len = length(&entry);
        let fits = groups.last().is_some_and(|g| {
            // Sorted: the newcomer is the group's longest.
            let padded = len * (g.len() + 1);
            g.len() < MOST_ROWS && 4 * padded <= 5 * (real + len)
        });
        if fits {
            real += len;
            groups.last_mut().expect("checked").push(entry);
        } else {
            real = len;
            groups.push(vec![entry]);
        }
    }
    groups
}

/// The logits of the last position of each row of `hidden` `[batch, seq, hidden]`, as f32,
/// row after row.
fn last_logits<M: CausalLm>(model: &M, hidden: Tensor<3>) -> Vec<f32> {
    let [b, s, d] = hidden.dims();
    let last = hidden.slice([0..b, s - 1..s, 0..d]);
    model
        .lm_head(last)
        .cast(burn::tensor::DType::F32)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("logits are floats")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, len: usize) -> (Request, Option<BiasDeltas>) {
        let request = Request {
            id,
            prompt: vec![1; len],
            adapter: None,
            config: GenerationConfig::new(),
        };
        (request, None)
    }

    #[test]
    fn joining_rows_are_prefilled_in_groups_of_similar_length() {
        let joining = [5, 40, 6, 5, 6, 41].iter().enumerate();
        let groups = prefill_groups(joining.map(|(i, &n)| request(i as u64, n)).collect());
        let ids: Vec<Vec<u64>> = groups
            .iter()
            .map(|g| g.iter().map(|(r, _)| r.id).collect())
            .collect();
        assert_eq!(ids, vec![vec![0, 3, 2, 4], vec![1, 5]]);
        // At most 16 rows a group, however alike.
        let groups = prefill_groups((0..40).map(|i| request(i, 8)).collect());
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![16, 16, 8]);
    }
}
