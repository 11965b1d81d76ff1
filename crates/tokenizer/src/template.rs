//! Chat templates: a model's Jinja template (from its GGUF metadata) rendered the way
//! Hugging Face `transformers` renders it (`trim_blocks`, `lstrip_blocks`, Python string
//! methods such as `.strip()`, `raise_exception`), so the prompt text, and therefore the
//! token ids, equal what vLLM builds for the same messages.

use minijinja::{context, Environment, Error, ErrorKind, Value};
use protocol::openai::ChatMessage;

/// A compiled chat template. Rendering is read-only and thread-safe.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| e.to_string())?;
        Ok(ChatTemplate { env })
    }

    /// Render `messages`. An error is the template's own complaint (for example roles that
    /// do not alternate) and belongs in a 400 answer.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                let content = m.content.as_ref().map(|c| c.text()).unwrap_or_default();
                match &m.name {
                    Some(name) => context! { role => m.role, content => content, name => name },
                    None => context! { role => m.role, content => content },
                }
            })
            .collect();
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => e.detail().unwrap_or("template error").to_string(),
            _ => format!("chat template: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::openai::MessageContent;

    fn msg(role: &str, text: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: Some(MessageContent::Text(text.into())),
            name: None,
        }
    }

    #[test]
    fn renders_like_transformers() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ bos_token }}{{ m['role'] }}: {{ m['content'].strip() }}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}",
        )
        .unwrap();
        let out = t
            .render(&[msg("user", "  hi  ")], true, "<s>", "</s>")
            .unwrap();
        // What jinja2 renders for this template with transformers' settings.
        assert_eq!(out, "  <s>user: hi\nA:");
    }

    #[test]
    fn raise_exception_is_an_error_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}",
        )
        .unwrap();
        assert_eq!(
            t.render(&[msg("assistant", "x")], true, "", "")
                .unwrap_err(),
            "Conversation roles must alternate"
        );
        assert!(ChatTemplate::new("{% for %}").is_err());
    }
}
