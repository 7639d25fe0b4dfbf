//! A request's parameters, checked once with the same rules and words whichever way it came:
//! `Params::from_browser` (send, regenerate) and `Params::from_openai` (the API), and the text
//! itself (`message`, `messages`).

use super::tools::{self, ToolChoice};
use super::AnswerError;
use crate::config::Config;
use crate::engine::{ChatMessage, Grammar, Role, Tool};

/// The field a parameter error is about (its name is the error's code, `invalid_<field>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Content,
    Messages,
    Temperature,
    TopP,
    MaxTokens,
    Stop,
    N,
    Message,
    TopLogprobs,
    ResponseFormat,
    Tools,
    ToolChoice,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::Content => "content",
            Field::Messages => "messages",
            Field::Temperature => "temperature",
            Field::TopP => "top_p",
            Field::MaxTokens => "max_tokens",
            Field::Stop => "stop",
            Field::N => "n",
            Field::Message => "message",
            Field::TopLogprobs => "top_logprobs",
            Field::ResponseFormat => "response_format",
            Field::Tools => "tools",
            Field::ToolChoice => "tool_choice",
        }
    }
}

/// Stop strings a request may add (an upstream takes four in all).
pub const MAX_STOP: usize = 4;

/// Functions a request may offer.
pub const MAX_TOOLS: usize = 128;

/// What the answer must be.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Format {
    /// Anything the model writes.
    #[default]
    Text,
    /// One JSON object.
    JsonObject,
    /// JSON matching this schema.
    JsonSchema(serde_json::Value),
}

/// How an answer is to be made.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub max_tokens: usize,
    /// `None`: the configured sampling.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Report each token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    pub format: Format,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
}

/// What an API request asks for.
#[derive(Debug, Default)]
pub struct Requested {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: Option<u32>,
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub format: Format,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
}

fn invalid(field: Field, message: String, message_zh: String) -> AnswerError {
    AnswerError::Invalid {
        field,
        message,
        message_zh,
    }
}

impl Params {
    /// The browser's parameters: a temperature and a length, both optional.
    pub fn from_browser(
        cfg: &Config,
        temperature: Option<f64>,
        max_tokens: Option<usize>,
    ) -> Result<Self, AnswerError> {
        Self::from_openai(
            cfg,
            Requested {
                temperature,
                max_tokens,
                ..Requested::default()
            },
        )
    }

    /// The API's parameters.
    pub fn from_openai(cfg: &Config, r: Requested) -> Result<Self, AnswerError> {
        if r.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(invalid(
                Field::Temperature,
                "temperature must be between 0 and 2".into(),
                "temperature 必须在 0 到 2 之间".into(),
            ));
        }
        if r.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return Err(invalid(
                Field::TopP,
                "top_p must be between 0 and 1".into(),
                "top_p 必须在 0 到 1 之间".into(),
            ));
        }
        if r.n.is_some_and(|n| n != 1) {
            return Err(invalid(
                Field::N,
                "only n = 1 is supported".into(),
                "n 只能为 1".into(),
            ));
        }
        if r.stop.len() > MAX_STOP {
            return Err(invalid(
                Field::Stop,
                format!("at most {MAX_STOP} stop sequences"),
                format!("最多 {MAX_STOP} 个停止序列"),
            ));
        }
        let limit = cfg.chat.max_tokens_limit;
        let max_tokens = match r.max_tokens {
            Some(n) if n == 0 || n > limit => {
                return Err(invalid(
                    Field::MaxTokens,
                    format!("max_tokens must be between 1 and {limit}"),
                    format!("max_tokens 必须在 1 到 {limit} 之间"),
                ))
            }
            Some(n) => n,
            None => cfg.engine.max_tokens.min(limit),
        };
        let logprobs = match (r.logprobs, r.top_logprobs) {
            (_, Some(k)) if k > crate::engine::logprobs::MAX_TOP => {
                let max = crate::engine::logprobs::MAX_TOP;
                return Err(invalid(
                    Field::TopLogprobs,
                    format!("top_logprobs must be between 0 and {max}"),
                    format!("top_logprobs 必须在 0 到 {max} 之间"),
                ));
            }
            (false, Some(_)) => {
                return Err(invalid(
                    Field::TopLogprobs,
                    "top_logprobs needs logprobs: true".into(),
                    "使用 top_logprobs 时 logprobs 必须为 true".into(),
                ))
            }
            (true, k) => Some(k.unwrap_or(0)),
            (false, None) => None,
        };
        let tool_choice = check_tools(&r.tools, r.tool_choice)?;
        let forced = matches!(tool_choice, ToolChoice::Required | ToolChoice::Function(_));
        if forced && r.format != Format::Text {
            return Err(invalid(
                Field::ResponseFormat,
                "response_format cannot be combined with a tool_choice that forces a call".into(),
                "response_format 不能与强制调用函数的 tool_choice 同时使用".into(),
            ));
        }
        Ok(Params {
            max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            seed: r.seed,
            stop: r.stop,
            logprobs,
            format: r.format,
            tools: r.tools,
            tool_choice,
        })
    }

    /// The grammar the answer must follow: a forced call, else the response format.
    pub fn grammar(&self) -> Option<Grammar> {
        if let Some(g) = tools::grammar(&self.tools, &self.tool_choice) {
            return Some(g);
        }
        match &self.format {
            Format::Text => None,
            Format::JsonObject => Some(Grammar::JsonSchema(serde_json::json!({"type": "object"}))),
            Format::JsonSchema(schema) => Some(Grammar::JsonSchema(schema.clone())),
        }
    }

    /// The functions the model is shown (none with `tool_choice: none`).
    pub fn shown_tools(&self) -> &[Tool] {
        match self.tool_choice {
            ToolChoice::None => &[],
            _ => &self.tools,
        }
    }
}

/// Checks the offered functions and the choice among them; returns the choice to use.
fn check_tools(tools: &[Tool], choice: Option<ToolChoice>) -> Result<ToolChoice, AnswerError> {
    let bad = |message: String, message_zh: String| invalid(Field::Tools, message, message_zh);
    if tools.len() > MAX_TOOLS {
        return Err(bad(
            format!("at most {MAX_TOOLS} tools"),
            format!("最多 {MAX_TOOLS} 个函数"),
        ));
    }
    for (i, t) in tools.iter().enumerate() {
        if !tools::valid_name(&t.name) {
            return Err(bad(
                format!("tools[{i}]: a function name is 1 to 64 letters, digits, _ or -"),
                format!("tools[{i}]：函数名须为 1 到 64 个字母、数字、_ 或 -"),
            ));
        }
        if tools[..i].iter().any(|o| o.name == t.name) {
            return Err(bad(
                format!("tools[{i}]: the name {} is used twice", t.name),
                format!("tools[{i}]：函数名 {} 重复", t.name),
            ));
        }
        if t.parameters.as_ref().is_some_and(|p| !p.is_object()) {
            return Err(bad(
                format!("tools[{i}]: parameters must be a JSON schema object"),
                format!("tools[{i}]：parameters 必须是 JSON schema 对象"),
            ));
        }
    }
    let choice = choice.unwrap_or(match tools.is_empty() {
        true => ToolChoice::None,
        false => ToolChoice::Auto,
    });
    let unknown = match &choice {
        ToolChoice::Function(name) => !tools.iter().any(|t| &t.name == name),
        ToolChoice::Required => tools.is_empty(),
        ToolChoice::None | ToolChoice::Auto => false,
    };
    if unknown {
        return Err(invalid(
            Field::ToolChoice,
            "tool_choice asks for a function that is not in tools".into(),
            "tool_choice 要求的函数不在 tools 中".into(),
        ));
    }
    Ok(choice)
}

/// A browser message, trimmed: not empty, at most `chat.max_message_chars` characters.
pub fn message(cfg: &Config, content: &str) -> Result<String, AnswerError> {
    let content = content.trim();
    if content.is_empty() {
        return Err(invalid(
            Field::Content,
            "the message is empty".into(),
            "消息不能为空".into(),
        ));
    }
    let max_chars = cfg.chat.max_message_chars;
    if content.chars().count() > max_chars {
        return Err(AnswerError::PromptTooLong {
            max_chars: Some(max_chars),
        });
    }
    Ok(content.to_string())
}

/// An API conversation: at least one user turn, at most four messages' worth of characters.
pub fn messages(cfg: &Config, messages: &[ChatMessage]) -> Result<(), AnswerError> {
    if !messages.iter().any(|m| m.role == Role::User) {
        return Err(invalid(
            Field::Messages,
            "there is no user message".into(),
            "缺少用户消息".into(),
        ));
    }
    let max_chars = cfg.chat.max_message_chars * 4;
    let chars: usize = messages.iter().map(|m| m.content.chars().count()).sum();
    if chars > max_chars {
        return Err(AnswerError::PromptTooLong {
            max_chars: Some(max_chars),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let mut c = Config::load(None).unwrap();
        c.chat.max_tokens_limit = 100;
        c.chat.max_message_chars = 10;
        c.engine.max_tokens = 512;
        c
    }

    fn field(r: Result<Params, AnswerError>) -> Field {
        match r {
            Err(AnswerError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_same_rules_for_both_ways_in() {
        let c = cfg();
        let p = Params::from_browser(&c, None, None).unwrap();
        assert_eq!(p.max_tokens, 100, "the default is capped by the limit");
        assert_eq!(
            Params::from_browser(&c, Some(0.5), Some(7))
                .unwrap()
                .max_tokens,
            7
        );
        assert_eq!(
            field(Params::from_browser(&c, Some(2.5), None)),
            Field::Temperature
        );
        assert_eq!(
            field(Params::from_browser(&c, None, Some(0))),
            Field::MaxTokens
        );
        assert_eq!(
            field(Params::from_browser(&c, None, Some(101))),
            Field::MaxTokens
        );
        let api = |r: Requested| Params::from_openai(&c, r);
        assert_eq!(
            field(api(Requested {
                temperature: Some(-0.1),
                ..Default::default()
            })),
            Field::Temperature
        );
        assert_eq!(
            field(api(Requested {
                top_p: Some(1.5),
                ..Default::default()
            })),
            Field::TopP
        );
        assert_eq!(
            field(api(Requested {
                n: Some(2),
                ..Default::default()
            })),
            Field::N
        );
        let five = vec!["a".to_string(); 5];
        assert_eq!(
            field(api(Requested {
                stop: five,
                ..Default::default()
            })),
            Field::Stop
        );
        let ok = api(Requested {
            seed: Some(3),
            stop: vec!["x".into()],
            n: Some(1),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((ok.seed, ok.stop.len()), (Some(3), 1));
    }

    #[test]
    fn messages_are_checked_for_length_and_a_user_turn() {
        let c = cfg();
        assert_eq!(message(&c, "  hi  ").unwrap(), "hi");
        assert!(matches!(
            message(&c, "   "),
            Err(AnswerError::Invalid {
                field: Field::Content,
                ..
            })
        ));
        assert!(matches!(
            message(&c, "12345678901"),
            Err(AnswerError::PromptTooLong {
                max_chars: Some(10)
            })
        ));
        let sys = ChatMessage::new(Role::System, "s");
        assert!(matches!(
            messages(&c, std::slice::from_ref(&sys)),
            Err(AnswerError::Invalid {
                field: Field::Messages,
                ..
            })
        ));
        let long = ChatMessage::new(Role::User, "x".repeat(41));
        assert!(matches!(
            messages(&c, &[long]),
            Err(AnswerError::PromptTooLong {
                max_chars: Some(40)
            })
        ));
        assert!(messages(&c, &[sys, ChatMessage::new(Role::User, "hi")]).is_ok());
    }
}
