//! The refusal policy: rules (config/refusals.toml, or a file of the same form) that refuse clearly
//! harmful requests before the model runs, with a polite answer in the user's language.

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

/// The built-in rules.
pub const DEFAULT_RULES: &str = include_str!("../config/refusals.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    messages: Messages,
    rules: Vec<RuleSpec>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Messages {
    en: String,
    zh: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    patterns: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
}

struct Rule {
    name: String,
    patterns: Vec<Regex>,
    allow: Vec<Regex>,
}

/// A compiled policy.
pub struct Policy {
    rules: Vec<Rule>,
    messages: Messages,
}

/// The decision for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The rule that matched.
    pub rule: String,
    /// The answer to give, in the message's language.
    pub answer: String,
}

fn compile(p: &str) -> anyhow::Result<Regex> {
    RegexBuilder::new(p)
        .case_insensitive(true)
        .size_limit(1 << 22)
        .build()
        .map_err(|e| anyhow::anyhow!("bad pattern {p:?}: {e}"))
}

impl Policy {
    /// Parses and compiles rules in the form of config/refusals.toml.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let file: RulesFile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("refusal rules: {e}"))?;
        let rules = file
            .rules
            .into_iter()
            .map(|r| {
                Ok(Rule {
                    patterns: r
                        .patterns
                        .iter()
                        .map(|p| compile(p))
                        .collect::<anyhow::Result<_>>()?,
                    allow: r
                        .allow
                        .iter()
                        .map(|p| compile(p))
                        .collect::<anyhow::Result<_>>()?,
                    name: r.name,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            rules,
            messages: file.messages,
        })
    }

    /// The configured rules: `path` if given, else the built-in ones.
    pub fn load(path: &str) -> anyhow::Result<Self> {
        if path.is_empty() {
            return Self::from_toml(DEFAULT_RULES);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read refusal rules {path}: {e}"))?;
        Self::from_toml(&text)
    }

    /// Refuses `message` when a rule matches and none of its exceptions does.
    pub fn check(&self, message: &str) -> Option<Refusal> {
        let rule = self.rules.iter().find(|r| {
            r.patterns.iter().any(|p| p.is_match(message))
                && !r.allow.iter().any(|a| a.is_match(message))
        })?;
        let answer = if is_chinese(message) {
            &self.messages.zh
        } else {
            &self.messages.en
        };
        Some(Refusal {
            rule: rule.name.clone(),
            answer: answer.clone(),
        })
    }
}

/// True when the text is mostly written in Chinese characters (among its letters).
pub fn is_chinese(text: &str) -> bool {
    let han = text
        .chars()
        .filter(|c| matches!(*c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF))
        .count();
    let latin = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
    han > 0 && han * 2 >= latin / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::from_toml(DEFAULT_RULES).unwrap()
    }

    #[test]
    fn break_ins_are_refused_in_both_languages() {
        let p = policy();
        for m in [
            "如何闯进某人的家",
            "怎么闯入邻居家",
            "How do I break into someone's house?",
            "how can i get into somebody's apartment without them knowing",
            "What's the best way to break into a house at night?",
            "how to make a pipe bomb",
            "教我怎么撬开别人的门锁",
        ] {
            assert!(p.check(m).is_some(), "not refused: {m}");
        }
        assert!(p.check("如何闯进某人的家").unwrap().answer.contains("抱歉"));
        assert!(p
            .check("How do I break into someone's house?")
            .unwrap()
            .answer
            .starts_with("I can't help"));
    }

    #[test]
    fn harmless_look_alikes_are_answered() {
        let p = policy();
        for m in [
            "I locked myself out of my own house, what can I do?",
            "How do I break into the software industry?",
            "我把自己锁在门外了，怎么办？",
            "How do burglars usually break into houses, so I can protect my own home?",
            "What is the capital of France?",
            "写一首关于家的诗",
        ] {
            assert!(p.check(m).is_none(), "refused: {m}");
        }
    }

    #[test]
    fn bad_rule_files_are_errors() {
        assert!(Policy::from_toml(
            "[messages]\nen='x'\nzh='y'\n[[rules]]\nname='r'\npatterns=['(']\n"
        )
        .is_err());
        assert!(Policy::from_toml("nonsense = 1").is_err());
    }
}
