//! Renders a conversation into prompt text with the model's Jinja chat template (minijinja).
//!
//! The template comes from `tokenizer.chat_template`; a model without one gets ChatML. Message
//! contents can be replaced by markers so that the caller can tokenize user text without letting
//! it smuggle in special tokens (see `prompt.rs`).

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// ChatML, used when the GGUF carries no chat template (or one minijinja cannot compile).
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Gemma's turn format, for Gemma vocabularies without a template (no system role: it is
/// folded into the first user turn, as Gemma's own template does).
pub const GEMMA: &str = "{% for message in messages %}{% if message.role != 'system' %}<start_of_turn>{{ 'model' if message.role == 'assistant' else 'user' }}\n{% if loop.index0 == 1 and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}{{ message.content }}<end_of_turn>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// The template to use when a model has none: the turn format its vocabulary was trained on.
pub fn fallback_for(has_token: impl Fn(&str) -> bool) -> &'static str {
    if has_token("<start_of_turn>") && !has_token("<|im_start|>") {
        GEMMA
    } else {
        CHATML
    }
}

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A function's result, given back to the model.
    Tool,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// The functions an assistant turn called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool turn answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

/// A call the model made: which function, with which arguments (JSON text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A message as chat templates expect it (OpenAI's shape, a call's arguments as an object).
fn template_message(m: &ChatMessage) -> serde_json::Value {
    let mut v = serde_json::json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let args = serde_json::from_str::<serde_json::Value>(&c.arguments)
                    .unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                serde_json::json!({"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": args}})
            })
            .collect();
        v["tool_calls"] = calls.into();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = id.clone().into();
    }
    v
}

/// Python's `json.dumps(value, ensure_ascii=False)` (the separators chat templates were trained
/// on), except that `<` is written `\u003c` so that no text in a schema or an argument can be
/// read as a special token such as `<|im_start|>` (the same JSON value).
fn tojson(value: minijinja::Value, _kwargs: minijinja::value::Kwargs) -> Result<String, Error> {
    struct Python;
    impl serde_json::ser::Formatter for Python {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Python);
    serde::Serialize::serialize(&value, &mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(text.replace('<', "\\u003c"))
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// True when the model's own template is used (false: ChatML fallback).
    pub is_native: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("is_native", &self.is_native)
            .finish()
    }
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn environment(source: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", source)?;
    Ok(env)
}

impl ChatTemplate {
    /// Compiles `source`, falling back to `fallback` (with a warning) when it is absent or invalid.
    pub fn new(source: Option<&str>, fallback: &str, bos_token: &str, eos_token: &str) -> Self {
        let native = source.and_then(|src| match environment(src.to_string()) {
            Ok(env) => Some(env),
            Err(e) => {
                tracing::warn!(
                    "the model's chat template does not compile ({e}); using a built-in one"
                );
                None
            }
        });
        let is_native = native.is_some();
        let env = native.unwrap_or_else(|| {
            environment(fallback.to_string()).expect("built-in templates compile")
        });
        Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            is_native,
        }
    }

    /// Renders `messages`, ending with the assistant's turn opener when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders `messages` with the functions the model may call (in OpenAI's `tools` shape, as
    /// templates expect; none: the template's plain form).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let tmpl = self.env.get_template("chat")?;
        let messages: Vec<serde_json::Value> = messages.iter().map(template_message).collect();
        let tools: Option<Vec<serde_json::Value>> = (!tools.is_empty()).then(|| {
            tools
                .iter()
                .map(|t| serde_json::json!({"type": "function", "function": t}))
                .collect()
        });
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(&messages)),
            tools => minijinja::Value::from(minijinja::value::Serde(&tools)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_roles_in_order() {
        let t = ChatTemplate::new(None, CHATML, "", "<|im_end|>");
        let out = t
            .render(
                &[
                    ChatMessage::new(Role::System, "S"),
                    ChatMessage::new(Role::User, "你好"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n");
        assert!(!t.is_native);
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% for m in messages %}{{ m.content.strip().upper() }}{% if m.role == 'assistant' %}{{ raise_exception('no') }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(Some(src), CHATML, "", "");
        assert!(t.is_native);
        assert_eq!(
            t.render(&[ChatMessage::new(Role::User, "  hi ")], false)
                .unwrap(),
            "HI"
        );
        let err = t
            .render(&[ChatMessage::new(Role::Assistant, "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("no"), "{err}");
    }

    #[test]
    fn gemma_vocabularies_get_gemma_turns_with_the_system_prompt_folded_in() {
        let t = ChatTemplate::new(
            None,
            fallback_for(|t| t == "<start_of_turn>"),
            "<bos>",
            "<eos>",
        );
        let msgs = [
            ChatMessage::new(Role::System, "S"),
            ChatMessage::new(Role::User, "Q"),
            ChatMessage::new(Role::Assistant, "A"),
            ChatMessage::new(Role::User, "Q2"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn broken_template_falls_back_to_chatml() {
        let t = ChatTemplate::new(Some("{% for %}"), CHATML, "", "");
        assert!(!t.is_native);
    }
}
