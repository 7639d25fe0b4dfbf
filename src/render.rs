//! Untrusted text → safe HTML: Markdown (tables, code, strikethrough) through pulldown-cmark, code
//! blocks highlighted by syntect (CSS classes, no inline styles, so the CSP holds), then ammonia's
//! allow-list sanitiser, so nothing the model or a user writes can run script.

use std::sync::OnceLock;

use pulldown_cmark::{html, CodeBlockKind, CowStr, Event, Options, Parser, Tag, TagEnd};
use syntect::html::{ClassStyle, ClassedHTMLGenerator};
use syntect::parsing::SyntaxSet;
use syntect::util::LinesWithEndings;

const CLASS_STYLE: ClassStyle = ClassStyle::SpacedPrefixed { prefix: "hl-" };

fn syntaxes() -> &'static SyntaxSet {
    static SET: OnceLock<SyntaxSet> = OnceLock::new();
    SET.get_or_init(SyntaxSet::load_defaults_newlines)
}

/// The stylesheet for highlighted code (served as /static/highlight.css).
pub fn highlight_css() -> &'static str {
    static CSS: OnceLock<String> = OnceLock::new();
    CSS.get_or_init(|| {
        let themes = syntect::highlighting::ThemeSet::load_defaults();
        let theme = &themes.themes["base16-ocean.dark"];
        syntect::html::css_for_theme_with_class_style(theme, CLASS_STYLE).unwrap_or_default()
    })
}

/// Highlighted HTML for `code` in language `lang` (plain escaped text when unknown).
fn highlight(code: &str, lang: &str) -> String {
    let set = syntaxes();
    let syntax = set
        .find_syntax_by_token(lang)
        .unwrap_or_else(|| set.find_syntax_plain_text());
    let mut gen = ClassedHTMLGenerator::new_with_class_style(syntax, set, CLASS_STYLE);
    for line in LinesWithEndings::from(code) {
        if gen
            .parse_html_for_line_which_includes_newline(line)
            .is_err()
        {
            return ammonia::clean_text(code);
        }
    }
    gen.finalize()
}

/// Renders Markdown to sanitised HTML.
pub fn markdown(text: &str) -> String {
    let mut opts = Options::empty();
    opts.insert(Options::ENABLE_TABLES);
    opts.insert(Options::ENABLE_STRIKETHROUGH);
    opts.insert(Options::ENABLE_TASKLISTS);
    let mut events = Vec::new();
    let mut code: Option<(String, String)> = None;
    for ev in Parser::new_ext(text, opts) {
        match ev {
            Event::Start(Tag::CodeBlock(kind)) => {
                let lang = match kind {
                    CodeBlockKind::Fenced(l) => {
                        l.split_whitespace().next().unwrap_or("").to_string()
                    }
                    CodeBlockKind::Indented => String::new(),
                };
                code = Some((lang, String::new()));
            }
            Event::Text(t) if code.is_some() => {
                code.as_mut().expect("inside a code block").1.push_str(&t)
            }
            Event::End(TagEnd::CodeBlock) => {
                let (lang, body) = code.take().unwrap_or_default();
                let class = lang
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '+')
                    .collect::<String>();
                let open = if class.is_empty() {
                    "<pre><code>".to_string()
                } else {
                    format!("<pre><code class=\"language-{class}\">")
                };
                events.push(Event::Html(CowStr::from(format!(
                    "{open}{}</code></pre>\n",
                    highlight(&body, &lang)
                ))));
            }
            other => events.push(other),
        }
    }
    let mut out = String::with_capacity(text.len() * 3 / 2);
    html::push_html(&mut out, events.into_iter());
    sanitize(&out)
}

/// Escapes plain text (user messages) and keeps line breaks.
pub fn plain(text: &str) -> String {
    let escaped = ammonia::clean_text(text);
    format!("<p>{}</p>", escaped.replace("&#10;", "<br>"))
}

fn sanitize(html: &str) -> String {
    ammonia::Builder::default()
        // No images at all: an <img> pointing elsewhere could leak data to another host.
        .rm_tags(&["img"])
        .add_tags(&["input", "span"])
        .add_tag_attributes("code", &["class"])
        .add_tag_attributes("span", &["class"])
        .add_tag_attributes("input", &["type", "checked", "disabled"])
        // Only the highlighter's and the code blocks' own classes survive.
        .attribute_filter(|_, attr, value| {
            if attr == "class"
                && !value
                    .split_whitespace()
                    .all(|c| c.starts_with("hl-") || c.starts_with("language-"))
            {
                None
            } else {
                Some(value.into())
            }
        })
        .link_rel(Some("noopener noreferrer nofollow"))
        .url_schemes(["http", "https", "mailto"].into_iter().collect())
        .clean(html)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_highlighted_code_render() {
        let h = markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n```rust\nfn main() {}\n```\n");
        assert!(h.contains("<table>") && h.contains("<td>1</td>"), "{h}");
        assert!(h.contains("<pre><code class=\"language-rust\">"), "{h}");
        assert!(h.contains("<span class=\"hl-"), "code is highlighted: {h}");
        assert!(
            highlight_css().contains(".hl-"),
            "theme CSS uses the same classes"
        );
    }

    #[test]
    fn script_and_handlers_are_removed() {
        let h = markdown("hi <img src=x onerror=alert(1)> <script>alert(2)</script> [x](javascript:alert(3)) <a href=\"https://e.com\" onclick=\"alert(4)\">y</a> <span class=\"cut-note\" style=\"color:red\">z</span>\n\n```html\n<script>alert(5)</script>\n```");
        for bad in [
            "<img",
            "onerror",
            "<script",
            "javascript:",
            "onclick",
            "cut-note",
            "style=",
        ] {
            assert!(!h.contains(bad), "{bad} in {h}");
        }
        assert!(h.contains("href=\"https://e.com\""), "{h}");
        assert!(
            h.contains("&lt;script&gt;") || h.contains("&lt;</span>"),
            "code is shown as text: {h}"
        );
    }

    #[test]
    fn plain_text_is_escaped() {
        assert_eq!(plain("<b>x</b>\ny"), "<p>&lt;b&gt;x&lt;&#47;b&gt;<br>y</p>");
    }
}
