//! [`ChatTemplate`]: a model's Jinja chat template (HF `tokenizer_config.json`'s
//! `chat_template`, GGUF's `tokenizer.chat_template`), rendered the way HF `transformers`'
//! `apply_chat_template` renders it.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, context};

use super::data::Message;
use crate::error::{ModelError, Result};

/// A compiled chat template with the special-token strings it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` with transformers' settings: `trim_blocks` and `lstrip_blocks`, loop
    /// controls, Python string methods (`.strip()`, `.startswith()`, ...), `raise_exception`
    /// and `tojson`. `bos_token` / `eos_token` are the strings the template sees under those
    /// names.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] with Jinja's message if the template does not compile.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_string()).map_err(|e| {
            ModelError::InvalidInput(format!("chat template does not compile: {e}"))
        })?;
        Ok(Self { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// Renders `messages`; with `add_generation_prompt`, the text ends where the assistant's
    /// reply begins (e.g. `<|im_start|>assistant\n`).
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] with the template's message (e.g. its own
    /// `raise_exception`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(context! {
                messages => Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::InvalidInput(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (from its GGUF's `tokenizer.chat_template`).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_and_without_the_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let messages = [Message::new("user", "Hi")];
        let system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
        assert_eq!(
            t.render(&messages, true).unwrap(),
            format!("{system}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        );
        assert_eq!(
            t.render(&messages, false).unwrap(),
            format!("{system}<|im_start|>user\nHi<|im_end|>\n")
        );
        let with_system = [Message::new("system", "S"), Message::new("user", "Hi")];
        assert_eq!(
            t.render(&with_system, false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_trim_blocks_and_raise_exception_work_as_in_transformers() {
        let source = "{% for m in messages %}\n  {% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}{% endif %}\n{{ bos_token }}{{ m.content.strip() }}{{ eos_token }}\n{% endfor %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[Message::new("user", "  a ")], false).unwrap(), "<s>a</s>\n");
        let error = t.render(&[Message::new("bad", "x")], false).unwrap_err().to_string();
        assert!(error.contains("no bad"), "{error}");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }
}
