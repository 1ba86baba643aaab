//! Text out of tokens as they come: the continuation decoded whole at each token and the new part
//! emitted, holding back what could still change (an incomplete UTF-8 character of byte-level
//! tokens, the start of a stop string).

use std::sync::Arc;

use peft::models::Tokenizer;

/// Why a continuation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// The name in OpenAI's responses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A continuation being decoded.
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Arc<[u32]>,
    stops: Vec<String>,
    /// Tokens of the text (an EOS is counted, never decoded).
    tokens: Vec<u32>,
    generated: usize,
    /// Bytes of the decoded text already emitted.
    emitted: usize,
    finished: Option<FinishReason>,
}

impl TextStream {
    /// A stream ending at any of `eos_token_ids` or of `stops` (the stop string is not emitted).
    pub fn new(tokenizer: Arc<Tokenizer>, eos_token_ids: Arc<[u32]>, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            eos_token_ids,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            tokens: Vec::new(),
            generated: 0,
            emitted: 0,
            finished: None,
        }
    }

    /// Tokens generated so far (an EOS included).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Why it ended, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Takes the next token; returns the text that is now certain (possibly empty). After an EOS
    /// or a stop string, [`TextStream::finished`] says so and later tokens are ignored.
    pub fn push(&mut self, token: u32) -> String {
        if self.finished.is_some() {
            return String::new();
        }
        self.generated += 1;
        if self.eos_token_ids.contains(&token) {
            self.finished = Some(FinishReason::Stop);
            return self.flush();
        }
        self.tokens.push(token);
        let text = self.decode();
        // A stop string anywhere in the text not yet emitted (it may straddle the emitted part's
        // end only by what was held back, which is never emitted).
        if let Some(at) = self.first_stop(&text) {
            self.finished = Some(FinishReason::Stop);
            let out = text.get(self.emitted..at).unwrap_or_default().to_string();
            self.emitted = at.max(self.emitted);
            return out;
        }
        if text.ends_with('\u{FFFD}') {
            return String::new();
        }
        let safe = text.len() - self.held_back(&text);
        if safe <= self.emitted {
            return String::new();
        }
        let out = text[self.emitted..safe].to_string();
        self.emitted = safe;
        out
    }

    /// Ends the stream at `max_tokens` (unless it already stopped); returns what was held back.
    pub fn finish_length(&mut self) -> String {
        if self.finished.is_some() {
            return String::new();
        }
        self.finished = Some(FinishReason::Length);
        self.flush()
    }

    fn flush(&mut self) -> String {
        let text = self.decode();
        let out = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        out
    }

    fn decode(&self) -> String {
        // A token the tokenizer cannot decode (outside its vocabulary) adds nothing.
        self.tokenizer
            .decode(&self.tokens, true)
            .unwrap_or_default()
    }

    /// Where the first stop string begins in `text`, at or after what was emitted.
    fn first_stop(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| {
                text.get(self.emitted..)
                    .and_then(|rest| rest.find(stop.as_str()))
                    .map(|at| self.emitted + at)
            })
            .min()
    }

    /// Bytes at the end of `text` that are a proper prefix of some stop string (they may become
    /// one), on a character boundary.
    fn held_back(&self, text: &str) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (len, _) in stop.char_indices().skip(1) {
                if len > longest && text.ends_with(&stop[..len]) {
                    longest = len;
                }
            }
        }
        longest
    }
}
