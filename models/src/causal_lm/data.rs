//! Supervised fine-tuning data for causal LMs: the JSONL formats [`parse_jsonl`] accepts and
//! the [`Example`] each line becomes.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::jsonl::parse_records;

/// One message of a conversation (`{"role": ..., "content": ...}`, HF's chat format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, or whatever the chat template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// What the model is given before its completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// Plain text (rendered through the chat template as one user message when the prompt style
    /// is chat).
    Text(String),
    /// A conversation whose next turn is the assistant's.
    Chat(Vec<Message>),
}

/// A multiple-choice question: the options and which one is right.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choices {
    /// The options, each scored as a completion of the prompt.
    pub options: Vec<String>,
    /// Index of the right option.
    pub answer: usize,
}

/// One supervised example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The prompt.
    pub prompt: Prompt,
    /// Accepted completions, at least one: the first is what training teaches; exact match
    /// accepts any of them.
    pub targets: Vec<String>,
    /// For multiple-choice data, the options (scored by likelihood for `accuracy`).
    pub choices: Option<Choices>,
}

impl Example {
    /// The completion training teaches (the first accepted target).
    pub fn target(&self) -> &str {
        &self.targets[0]
    }
}

/// The field sets a line may have, as named in errors.
pub const FORMATS: &str = "{\"input\", \"target\"} (target a string or a list), {\"input\", \"label\", \
     \"choices\"}, {\"prompt\", \"completion\"}, {\"question\", \"answer\"} or {\"messages\": [...]}";

/// Whether a JSON object has the fields of a supervised causal-LM line (any of [`FORMATS`]
/// except `question`/`answer`, which an encoder reads as retrieval data).
pub fn is_causal_lm_record(value: &Value) -> bool {
    ["input", "prompt", "messages"].iter().any(|k| value.get(k).is_some())
}

/// Parses one JSON object into an [`Example`]; the error is the message only (the caller adds
/// the file and line).
///
/// Formats, checked in this order:
/// - `{"messages": [{"role", "content"}, ...]}`: the last message must be the assistant's; it is
///   the target and the earlier ones are the prompt;
/// - `{"prompt", "completion"}`;
/// - `{"input", "target"}` (BIG-bench generation; `target` a string or a non-empty list of
///   accepted strings) and/or `{"input", "label", "choices"}` (multiple choice; `label` is the
///   right option's text or index); when both are present the target is trained and the choices
///   are scored;
/// - `{"question", "answer"}`.
///
/// # Errors
/// A message naming the missing, empty or mistyped field.
pub fn parse_record(value: &Value) -> std::result::Result<Example, String> {
    let string = |name: &str| match value.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("`{name}` is empty")),
        Some(other) => Err(format!("`{name}` must be a string, found {}", short(other))),
        None => Err(format!("missing field `{name}`")),
    };
    if let Some(messages) = value.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
            format!("`messages` must be a list of {{\"role\", \"content\"}} strings: {e}")
        })?;
        let Some((last, prompt)) = messages.split_last() else {
            return Err("`messages` is empty".into());
        };
        if last.role != "assistant" {
            return Err(format!(
                "the last message must be the assistant's (the target), found role `{}`",
                last.role
            ));
        }
        if prompt.is_empty() {
            return Err("`messages` has no message before the assistant's".into());
        }
        return Ok(Example {
            prompt: Prompt::Chat(prompt.to_vec()),
            targets: vec![last.content.clone()],
            choices: None,
        });
    }
    if value.get("prompt").is_some() {
        return Ok(Example {
            prompt: Prompt::Text(string("prompt")?),
            targets: vec![string("completion")?],
            choices: None,
        });
    }
    if value.get("input").is_some() {
        let input = string("input")?;
        let choices = match value.get("choices") {
            None => None,
            Some(Value::Array(items)) => {
                let options = items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            format!("`choices` must hold strings, found {}", short(v))
                        })
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                if options.len() < 2 {
                    return Err("`choices` needs at least two options".into());
                }
                let answer = match value.get("label") {
                    Some(Value::String(label)) => options
                        .iter()
                        .position(|o| o == label)
                        .ok_or_else(|| format!("`label` {label:?} is not one of `choices`"))?,
                    Some(Value::Number(n)) => n
                        .as_u64()
                        .map(|i| i as usize)
                        .filter(|&i| i < options.len())
                        .ok_or_else(|| format!("`label` {n} is not an index into `choices`"))?,
                    Some(other) => {
                        return Err(format!(
                            "`label` must be a string or an index, found {}",
                            short(other)
                        ));
                    }
                    None => return Err("`choices` without a `label`".into()),
                };
                Some(Choices { options, answer })
            }
            Some(other) => return Err(format!("`choices` must be a list, found {}", short(other))),
        };
        let targets = match value.get("target") {
            Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| match v.as_str() {
                    Some(s) if !s.is_empty() => Ok(s.to_string()),
                    _ => Err(format!(
                        "`target` list items must be non-empty strings, found {}",
                        short(v)
                    )),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(format!(
                    "`target` must be a non-empty string or list of strings, found {}",
                    short(other)
                ));
            }
            None => match &choices {
                Some(c) => vec![c.options[c.answer].clone()],
                None => return Err("missing field `target` (or `label` with `choices`)".into()),
            },
        };
        return Ok(Example { prompt: Prompt::Text(input), targets, choices });
    }
    if value.get("question").is_some() {
        return Ok(Example {
            prompt: Prompt::Text(string("question")?),
            targets: vec![string("answer")?],
            choices: None,
        });
    }
    Err(format!("expected one of {FORMATS}"))
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        format!("{}…", text.chars().take(40).collect::<String>())
    } else {
        text
    }
}

/// Parses JSONL text, one [`Example`] per non-blank line (see [`parse_record`]); `path` names
/// the source in errors.
///
/// # Errors
/// [`ModelError::Data`] naming `FILE:LINE` for invalid JSON or a line that is not one of the
/// [`FORMATS`]; [`ModelError::Data`] (line 0) for a file without examples.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Example>> {
    parse_records(text, path, "no examples", |value| {
        if !value.is_object() {
            return Err(format!("expected a JSON object, one of {FORMATS}"));
        }
        parse_record(value)
    })
}

/// Reads a JSONL data file (see [`parse_jsonl`]).
///
/// # Errors
/// [`ModelError::Io`] if it cannot be read; otherwise as [`parse_jsonl`].
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    parse_jsonl(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> std::result::Result<Example, String> {
        parse_record(&serde_json::from_str(line).unwrap())
    }

    #[test]
    fn every_format_parses() {
        let e = parse(r#"{"input": "What is 1 plus 2?", "target": "3"}"#).unwrap();
        assert_eq!(
            (e.prompt, e.targets, e.choices),
            (Prompt::Text("What is 1 plus 2?".into()), vec!["3".to_string()], None)
        );
        let e = parse(r#"{"input": "count", "target": ["twelve", "12"]}"#).unwrap();
        assert_eq!(e.targets, ["twelve", "12"]);
        let e = parse(r#"{"input": "q", "label": "b", "choices": ["a", "b", "c"]}"#).unwrap();
        assert_eq!(
            e.choices,
            Some(Choices { options: vec!["a".into(), "b".into(), "c".into()], answer: 1 })
        );
        assert_eq!(e.target(), "b");
        let e = parse(r#"{"input": "q", "label": 2, "choices": ["a", "b", "c"], "target": "c!"}"#)
            .unwrap();
        assert_eq!((e.target(), e.choices.as_ref().unwrap().answer), ("c!", 2));
        let e = parse(r#"{"prompt": "p", "completion": " c"}"#).unwrap();
        assert_eq!((&e.prompt, e.target()), (&Prompt::Text("p".into()), " c"));
        let e = parse(r#"{"question": "q", "answer": "a"}"#).unwrap();
        assert_eq!(e.target(), "a");
        let e = parse(r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#).unwrap();
        assert_eq!(
            e.prompt,
            Prompt::Chat(vec![Message::new("system", "s"), Message::new("user", "u")])
        );
        assert_eq!(e.target(), "a");
    }

    #[test]
    fn malformed_lines_name_the_problem_and_the_line() {
        let cases = [
            (r#"{"input": "q"}"#, "missing field `target`"),
            (r#"{"input": "q", "target": []}"#, "non-empty string or list"),
            (r#"{"input": "q", "target": [""]}"#, "non-empty strings"),
            (r#"{"input": "q", "label": "z", "choices": ["a", "b"]}"#, "not one of `choices`"),
            (r#"{"input": "q", "label": 5, "choices": ["a", "b"]}"#, "not an index"),
            (r#"{"input": "q", "choices": ["a", "b"]}"#, "without a `label`"),
            (r#"{"prompt": "p"}"#, "missing field `completion`"),
            (r#"{"messages": [{"role": "user", "content": "u"}]}"#, "must be the assistant's"),
            (r#"{"messages": [{"role": "assistant", "content": "a"}]}"#, "no message before"),
            (r#"{"messages": "hi"}"#, "list of"),
            (r#"{"text": "t"}"#, "expected one of"),
        ];
        for (line, needle) in cases {
            let message = parse(line).expect_err(line);
            assert!(message.contains(needle), "{line}: {message}");
        }
        let good = r#"{"input": "q", "target": "t"}"#;
        match parse_jsonl(&format!("{good}\n\n{good}\n[1]\n"), Path::new("d.jsonl")) {
            Err(e @ ModelError::Data { line: 4, .. }) => {
                assert!(e.to_string().starts_with("d.jsonl:4: expected a JSON object"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_jsonl("\n", Path::new("d")), Err(ModelError::Data { line: 0, .. })));
    }
}
