//! Chat templates: a model's Jinja template (from its GGUF metadata) rendered the way
//! Hugging Face `transformers` renders it (`trim_blocks`, `lstrip_blocks`, Python string
//! methods such as `.strip()`, `raise_exception`), so the prompt text, and therefore the
//! token ids, equal what vLLM builds for the same messages.

use minijinja::{context, Environment, Error, ErrorKind, Value};
use protocol::openai::ChatMessage;

/// Gemma 3's chat template, as the instruction-tuned models' files carry it (Hugging Face
/// `google/gemma-3-*-it`, `tokenizer_config.json`): used for a Gemma vocabulary whose file
/// has no template (the base models ship none). Roles alternate user/model, a system
/// message is folded into the first user turn.
pub const GEMMA3_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

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

/// `continue_final_message`: cut a prompt rendered without a generation prompt right
/// after the final message's text, leaving that message open for the model to continue.
/// Transformers' `apply_chat_template` does exactly this (vLLM calls it): find the last
/// occurrence of the stripped text, keep its leading part, and its trailing whitespace
/// only where the template kept it. An error when the template dropped the text.
pub fn continue_final_message(rendered: &str, final_text: &str) -> Result<String, String> {
    let stripped = final_text.trim();
    let Some(loc) = rendered.rfind(stripped) else {
        return Err(
            "continue_final_message is set but the final message does not appear in \
                    the chat after applying the chat template! This can happen if the chat \
                    template deletes portions of the final message. Please verify the chat \
                    template and final message in your chat to ensure they are compatible."
                .into(),
        );
    };
    let left = final_text.trim_start();
    let end = if rendered[loc..].starts_with(left) {
        loc + left.len()
    } else {
        loc + stripped.len()
    };
    Ok(rendered[..end].to_string())
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

    #[test]
    fn continue_final_message_cuts_after_the_final_text() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        )
        .unwrap();
        let msgs = [msg("user", "hi"), msg("assistant", "Hello, wor")];
        let out = t.render(&msgs, false, "", "").unwrap();
        assert_eq!(
            continue_final_message(&out, "Hello, wor").unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello, wor"
        );
        // Trailing space kept by the template is kept; one it strips is not invented.
        let msgs = [msg("user", "hi"), msg("assistant", "Hello ")];
        let out = t.render(&msgs, false, "", "").unwrap();
        assert!(continue_final_message(&out, "Hello ")
            .unwrap()
            .ends_with("assistant\nHello "));
        let strip = ChatTemplate::new(
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'].strip() }}\n{% endfor %}",
        )
        .unwrap();
        let out = strip.render(&msgs, false, "", "").unwrap();
        assert_eq!(
            continue_final_message(&out, "Hello ").unwrap(),
            "user: hi\nassistant: Hello"
        );
        assert!(continue_final_message("nothing here", "absent").is_err());
    }
}
