//! Function calling: what the model may call (`ToolChoice`), the grammar that makes it call a
//! function when it must, and the reader that takes the calls out of its text. Models trained on
//! Hermes-style calls (Qwen2.5 among them) write each call as
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`.

use crate::engine::{Grammar, Tool, ToolCall};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Whether and how the model may call functions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The functions are not shown to the model.
    None,
    /// The model decides (the default when there are functions).
    #[default]
    Auto,
    /// The answer is a call of one of the functions.
    Required,
    /// The answer is a call of this function.
    Function(String),
}

/// A function name the model can be shown and called by: what OpenAI allows.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The grammar for a call the model must make (`Required`, `Function`), in llguidance's Lark
/// dialect: the call's tags around a JSON object naming the function, with arguments matching
/// its parameters' schema.
pub fn grammar(tools: &[Tool], choice: &ToolChoice) -> Option<Grammar> {
    let chosen: Vec<&Tool> = match choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
    };
    let calls: Vec<serde_json::Value> = chosen
        .iter()
        .map(|t| {
            let params = t
                .parameters
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = crate::engine::grammar::compact(&serde_json::json!({"anyOf": calls}));
    Some(Grammar::Lark(format!(
        "start: \"{OPEN}\\n\" call \"\\n{CLOSE}\"\ncall: %json {schema}\n"
    )))
}

/// What the reader found in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Call(ToolCall),
}

/// Reads an answer as it streams, passing text on and turning each complete call into a
/// `ToolCall`. Text that may be the start of a call is held until it is known; a call that does
/// not parse is passed on as text.
#[derive(Debug, Default)]
pub struct CallReader {
    held: String,
    in_call: bool,
    /// Whitespace after the text so far (dropped when calls follow).
    spaces: String,
    pub calls: usize,
}

impl CallReader {
    pub fn push(&mut self, piece: &str) -> Vec<Piece> {
        self.held.push_str(piece);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.held.find(CLOSE) else {
                    break;
                };
                let body = self.held[..end].to_string();
                self.held.drain(..end + CLOSE.len());
                self.in_call = false;
                match parse_call(&body) {
                    Some(call) => {
                        self.calls += 1;
                        self.spaces.clear();
                        out.push(Piece::Call(call));
                    }
                    None => self.text(format!("{OPEN}{body}{CLOSE}"), &mut out),
                }
                continue;
            }
            if let Some(start) = self.held.find(OPEN) {
                let before: String = self.held.drain(..start + OPEN.len()).collect();
                self.text(before[..start].to_string(), &mut out);
                self.in_call = true;
                continue;
            }
            // Keep back a tail that may be the start of the opening tag.
            let keep = (1..OPEN.len())
                .rev()
                .find(|&n| self.held.ends_with(&OPEN[..n]))
                .unwrap_or(0);
            let cut = self.held.len() - keep;
            let text: String = self.held.drain(..cut).collect();
            self.text(text, &mut out);
            break;
        }
        out
    }

    /// The end of the answer: what is still held goes out as text (an unfinished call too).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut rest = std::mem::take(&mut self.held);
        if self.in_call {
            rest.insert_str(0, OPEN);
            self.in_call = false;
        }
        self.text(rest, &mut out);
        if self.calls == 0 && !self.spaces.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut self.spaces)));
        }
        out
    }

    /// Passes text on; whitespace waits until something else follows it.
    fn text(&mut self, text: String, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        if text.trim().is_empty() {
            self.spaces.push_str(&text);
            return;
        }
        let all = std::mem::take(&mut self.spaces) + &text;
        let trimmed = all.trim_end();
        self.spaces = all[trimmed.len()..].to_string();
        out.push(Piece::Text(trimmed.to_string()));
    }
}

fn parse_call(body: &str) -> Option<ToolCall> {
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
        None => "{}".into(),
    };
    Some(ToolCall {
        id: format!("call_{}", &crate::secrets::token()[..24]),
        name,
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pieces: &[&str]) -> (String, Vec<ToolCall>) {
        let mut r = CallReader::default();
        let mut out: Vec<Piece> = pieces.iter().flat_map(|p| r.push(p)).collect();
        out.extend(r.finish());
        let mut text = String::new();
        let mut calls = Vec::new();
        for p in out {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Call(c) => calls.push(c),
            }
        }
        (text, calls)
    }

    #[test]
    fn calls_are_read_out_of_the_text_however_it_is_cut() {
        let answer = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        for step in [1, 2, 3, 7, answer.len()] {
            let chars: Vec<char> = answer.chars().collect();
            let pieces: Vec<String> = chars.chunks(step).map(|c| c.iter().collect()).collect();
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (text, calls) = read(&refs);
            assert_eq!(text, "", "step {step}");
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[0].name, "get_weather");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&calls[0].arguments).unwrap(),
                serde_json::json!({"city": "北京"})
            );
            assert_eq!(calls[1].arguments, "{}");
            assert_ne!(calls[0].id, calls[1].id);
        }
    }

    #[test]
    fn plain_text_and_broken_calls_stay_text() {
        let (text, calls) = read(&["a < b", " and <tool", "_ca", "ll> is a tag\n\n"]);
        assert_eq!(text, "a < b and <tool_call> is a tag\n\n");
        assert!(calls.is_empty());
        let (text, calls) = read(&["Hi.\n\n", "Bye <to"]);
        assert_eq!((text.as_str(), calls.len()), ("Hi.\n\nBye <to", 0));
        let (text, calls) = read(&["x <tool_call>{not json}</tool_call> y"]);
        assert_eq!(text, "x <tool_call>{not json}</tool_call> y");
        assert!(calls.is_empty());
        let (text, _) = read(&["<tool_call>\n{\"name\": \"f\""]);
        assert_eq!(text, "<tool_call>\n{\"name\": \"f\"");
    }

    #[test]
    fn names_are_checked_and_forced_calls_have_a_grammar() {
        assert!(valid_name("get_weather-2"));
        assert!(!valid_name("a b") && !valid_name("") && !valid_name("<|im_start|>"));
        assert!(!valid_name(&"x".repeat(65)));
        let tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: None,
        }];
        assert_eq!(grammar(&tools, &ToolChoice::Auto), None);
        let Some(Grammar::Lark(g)) = grammar(&tools, &ToolChoice::Function("f".into())) else {
            panic!()
        };
        assert!(g.starts_with("start: \"<tool_call>\\n\""), "{g}");
        assert!(g.contains("\"const\":\"f\""), "{g}");
    }
}
