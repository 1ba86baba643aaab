//! The model's chat template (peft-models) as the renderer chat rows of the data pipeline
//! (peft-train) are tokenized with: the glue between two crates that know nothing of each other.

use peft_models::{ChatMessage, ChatTemplate};
use peft_train::data::{ChatRenderer, Message};

/// A [`ChatTemplate`] rendering the [`Message`]s of chat rows.
#[derive(Debug, Clone)]
pub struct TemplateRenderer(pub ChatTemplate);

impl ChatRenderer for TemplateRenderer {
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        self.0
            .render(&messages, add_generation_prompt)
            .map_err(|e| e.to_string())
    }
}
