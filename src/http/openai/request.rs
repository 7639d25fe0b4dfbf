//! A chat completion request as OpenAI shapes it, read into the answer path's terms: the
//! conversation (with function calls and their results), the sampling settings,
//! log-probabilities, the response format and the functions on offer.

use serde::Deserialize;

use super::ApiError;
use crate::answer::params::{Format, Requested};
use crate::answer::tools::ToolChoice;
use crate::engine::{ChatMessage, Role, Tool, ToolCall};
use crate::http::{AppError, Field};

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    #[allow(dead_code)]
    model: Option<String>,
    pub messages: Vec<ApiMessage>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    stop: Option<StopField>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    response_format: Option<ResponseFormat>,
    tools: Option<Vec<ApiTool>>,
    tool_choice: Option<ApiToolChoice>,
    #[serde(default)]
    pub stream: bool,
    /// OpenAI's switch for keeping a completion: here it files the exchange in the browser history.
    #[serde(default)]
    pub store: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
pub(super) struct StreamOptions {
    /// Send a last chunk (empty `choices`) with the token counts, as OpenAI does.
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

#[derive(Deserialize)]
struct JsonSchema {
    #[allow(dead_code)]
    name: Option<String>,
    /// No schema: any JSON object.
    schema: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ApiTool {
    Function { function: Tool },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ApiToolChoice {
    Mode(ToolMode),
    Named(NamedTool),
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ToolMode {
    None,
    Auto,
    Required,
}

#[derive(Deserialize)]
struct NamedTool {
    #[serde(rename = "type")]
    #[allow(dead_code)]
    kind: FunctionKind,
    function: NamedFunction,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum FunctionKind {
    Function,
}

#[derive(Deserialize)]
struct NamedFunction {
    name: String,
}

#[derive(Deserialize)]
pub(super) struct ApiMessage {
    role: ApiRole,
    /// May be null on an assistant turn that only calls functions.
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Vec<ApiToolCall>,
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct ApiToolCall {
    id: String,
    #[serde(rename = "type")]
    #[allow(dead_code)]
    kind: FunctionKind,
    function: CalledFunction,
}

#[derive(Deserialize)]
struct CalledFunction {
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ApiRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    /// Any other role (`function`): refused with a clear message.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: PartKind,
    text: Option<String>,
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PartKind {
    Text,
    /// Images, audio and files: refused with a clear message.
    #[serde(other)]
    Other,
}

pub(super) fn invalid(field: Field, message: &str) -> ApiError {
    ApiError(AppError::invalid(field, message, "请求参数无效。"))
}

impl CompletionRequest {
    /// The settings, for `Params::from_openai` to check.
    pub fn requested(&mut self) -> Requested {
        let format = match self.response_format.take() {
            None | Some(ResponseFormat::Text) => Format::Text,
            Some(ResponseFormat::JsonObject) => Format::JsonObject,
            Some(ResponseFormat::JsonSchema { json_schema }) => match json_schema.schema {
                Some(schema) => Format::JsonSchema(schema),
                None => Format::JsonObject,
            },
        };
        let tool_choice = self.tool_choice.take().map(|c| match c {
            ApiToolChoice::Mode(ToolMode::None) => ToolChoice::None,
            ApiToolChoice::Mode(ToolMode::Auto) => ToolChoice::Auto,
            ApiToolChoice::Mode(ToolMode::Required) => ToolChoice::Required,
            ApiToolChoice::Named(n) => ToolChoice::Function(n.function.name),
        });
        Requested {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            seed: self.seed,
            stop: match self.stop.take() {
                None => vec![],
                Some(StopField::One(s)) => vec![s],
                Some(StopField::Many(v)) => v,
            },
            n: self.n,
            logprobs: self.logprobs.unwrap_or(false),
            top_logprobs: self.top_logprobs,
            format,
            tools: self
                .tools
                .take()
                .unwrap_or_default()
                .into_iter()
                .map(|ApiTool::Function { function }| function)
                .collect(),
            tool_choice,
        }
    }
}

/// The conversation in the engine's terms.
pub(super) fn to_messages(msgs: Vec<ApiMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    let field = Field::Request("messages");
    msgs.into_iter()
        .map(|m| {
            let role = match m.role {
                ApiRole::System | ApiRole::Developer => Role::System,
                ApiRole::User => Role::User,
                ApiRole::Assistant => Role::Assistant,
                ApiRole::Tool => Role::Tool,
                ApiRole::Other => {
                    return Err(invalid(
                        field,
                        "roles must be system, developer, user, assistant or tool",
                    ))
                }
            };
            let content = match m.content {
                None if role == Role::Assistant => String::new(),
                None => return Err(invalid(field, "a message needs its content")),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    if parts.iter().any(|p| p.kind != PartKind::Text) {
                        return Err(invalid(field, "only text content is supported"));
                    }
                    parts
                        .into_iter()
                        .filter_map(|p| p.text)
                        .collect::<Vec<_>>()
                        .join("")
                }
            };
            if !m.tool_calls.is_empty() && role != Role::Assistant {
                return Err(invalid(field, "only assistant messages carry tool_calls"));
            }
            let mut message = ChatMessage::new(role, content);
            for call in m.tool_calls {
                if !crate::answer::tools::valid_name(&call.function.name) {
                    return Err(invalid(
                        field,
                        "a function name is 1 to 64 letters, digits, _ or -",
                    ));
                }
                message.tool_calls.push(ToolCall {
                    id: call.id,
                    name: call.function.name,
                    arguments: call.function.arguments,
                });
            }
            message.tool_call_id = match role {
                Role::Tool => Some(m.tool_call_id.ok_or_else(|| {
                    invalid(field, "a tool message needs the tool_call_id it answers")
                })?),
                _ => None,
            };
            Ok(message)
        })
        .collect()
}
