//! A model's chat template, rendered as transformers' `apply_chat_template` renders it.
//!
//! The template is Jinja: `chat_template.jinja` in the model directory, or else `chat_template`
//! in `tokenizer_config.json` (a string, or a list of `{"name", "template"}` of which `default`
//! is used), as transformers 5 looks them up. It is rendered with minijinja in transformers'
//! settings (`trim_blocks`, `lstrip_blocks`, loop controls), with Python's string and dict
//! methods (`.strip()`, `.startswith()`, `.items()`, ...: minijinja-contrib's `pycompat`), the
//! functions transformers adds (`raise_exception`, `strftime_now`) and the tokenizer's special
//! tokens as variables (`bos_token`, `eos_token`, ...). The rendered text is then encoded without
//! adding special tokens, as `apply_chat_template(tokenize=True)` does.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{ModelError, Result};

/// Name of the template file transformers 5 writes beside the tokenizer.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may know others).
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template with the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// Where the template was read (named in errors).
    pub path: PathBuf,
    /// The Jinja source.
    pub source: String,
    /// Special tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`,
    /// `unk_token`), passed to the template as variables.
    pub special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    /// The chat template of a model directory (or a GGUF file's `tokenizer.chat_template`),
    /// `None` when it has none.
    ///
    /// # Errors
    ///
    /// A template or `tokenizer_config.json` that cannot be read or is malformed (names the file
    /// and key).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        if crate::gguf_model::is_gguf_file(dir) {
            return crate::gguf_model::GgufModel::open(dir)?.chat_template();
        }
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
                path: config_path.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|e| ModelError::ChatTemplate {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?
        } else {
            serde_json::Value::Null
        };
        let special_tokens = ["bos_token", "eos_token", "pad_token", "unk_token"]
            .into_iter()
            .filter_map(|key| {
                let token = match config.get(key)? {
                    serde_json::Value::String(s) => s.clone(),
                    // Older files store AddedToken dicts.
                    serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                    _ => return None,
                };
                Some((key.to_string(), token))
            })
            .collect();
        let file = dir.join(CHAT_TEMPLATE_FILE);
        if file.is_file() {
            let source = std::fs::read_to_string(&file).map_err(|source| ModelError::Io {
                path: file.clone(),
                source,
            })?;
            return Ok(Some(Self {
                path: file,
                source,
                special_tokens,
            }));
        }
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"));
                match default.and_then(|t| t.get("template")?.as_str()) {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(ModelError::ChatTemplate {
                            path: config_path,
                            message: "field \"chat_template\" is a list without a \"default\" \
                                      template"
                                .into(),
                        });
                    }
                }
            }
            Some(other) => {
                return Err(ModelError::ChatTemplate {
                    path: config_path,
                    message: format!(
                        "field \"chat_template\" must be a string or a list of named templates, \
                         found {other}"
                    ),
                });
            }
        };
        Ok(Some(Self {
            path: config_path,
            source,
            special_tokens,
        }))
    }

    /// The text of `messages` under this template; with `add_generation_prompt`, followed by
    /// what opens the assistant's turn.
    ///
    /// # Errors
    ///
    /// A template that does not parse, or whose rendering fails (`raise_exception` included),
    /// naming the template's file.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let error = |e: minijinja::Error| ModelError::ChatTemplate {
            path: self.path.clone(),
            message: match e.kind() {
                ErrorKind::InvalidOperation => {
                    e.detail().map_or_else(|| e.to_string(), str::to_string)
                }
                _ => e.to_string(),
            },
        };
        let mut env = Environment::new();
        // transformers' ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            strftime_utc(&format, unix_now())
        });
        env.add_template("chat", &self.source).map_err(error)?;
        let template = env.get_template("chat").map_err(error)?;
        let mut ctx: std::collections::BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert(
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        template.render(Value::from(ctx)).map_err(error)
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `time.strftime(format)` for the fields chat templates use (`%d %m %Y %y %b %B %a %A %H %M %S
/// %j %%`), in UTC. transformers' `strftime_now` uses the local time of the machine; with no
/// time-zone database at hand (no calendar crate for one helper) we use UTC, which is what
/// servers and CI machines run in. Llama 3.x templates print "Today Date: 03 Dec 2026" with it.
fn strftime_utc(format: &str, unix_seconds: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before_month = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][month as usize - 1];
    let day_of_year = before_month + day + i64::from(leap && month > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[month as usize - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out += &format!("{day:02}"),
            Some('m') => out += &format!("{month:02}"),
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year % 100),
            Some('b') => out += &month_name[..3],
            Some('B') => out += month_name,
            Some('a') => out += &weekday[..3],
            Some('A') => out += weekday,
            Some('H') => out += &format!("{:02}", secs / 3_600),
            Some('M') => out += &format!("{:02}", secs % 3_600 / 60),
            Some('S') => out += &format!("{:02}", secs % 60),
            Some('j') => out += &format!("{day_of_year:03}"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            path: "chat_template.jinja".into(),
            source: source.into(),
            special_tokens: vec![("bos_token".into(), "<s>".into())],
        }
    }

    #[test]
    fn renders_chatml_with_python_methods_and_special_tokens() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        );
        let text = t
            .render(&[ChatMessage::new("system", "  Be brief. ")], true)
            .unwrap();
        assert_eq!(
            text,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_file() {
        let t = template(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}",
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("chat_template.jinja"), "{err}");
        assert!(err.contains("Conversation must start with user"), "{err}");
    }

    #[test]
    fn strftime_matches_python_in_utc() {
        // time.strftime("%d %b %Y|%A %j|%H:%M:%S|%B %m %y %%", time.gmtime(1796291107))
        assert_eq!(
            strftime_utc("%d %b %Y|%A %j|%H:%M:%S|%B %m %y %%", 1_796_291_107),
            "03 Dec 2026|Thursday 337|09:45:07|December 12 26 %"
        );
        // A leap day and the epoch.
        assert_eq!(
            strftime_utc("%Y-%m-%d %j %a", 951_782_400),
            "2000-02-29 060 Tue"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %A", 0), "1970-01-01 Thursday");
    }

    #[test]
    fn trims_blocks_as_transformers_does() {
        let t = template(
            "{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}",
        );
        assert_eq!(
            t.render(&[ChatMessage::new("user", "a")], false).unwrap(),
            "a\n"
        );
    }
}
