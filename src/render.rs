//! Untrusted text → safe HTML: Markdown (tables, code, strikethrough) through pulldown-cmark,
//! then ammonia's allow-list sanitiser, so nothing the model or a user writes can run script.

use pulldown_cmark::{html, Options, Parser};

/// Renders Markdown to sanitised HTML.
pub fn markdown(text: &str) -> String {
    let mut opts = Options::empty();
    opts.insert(Options::ENABLE_TABLES);
    opts.insert(Options::ENABLE_STRIKETHROUGH);
    opts.insert(Options::ENABLE_TASKLISTS);
    let mut out = String::with_capacity(text.len() * 3 / 2);
    html::push_html(&mut out, Parser::new_ext(text, opts));
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
        .add_tag_attributes("code", &["class"])
        .add_tag_attributes("input", &["type", "checked", "disabled"])
        .add_tags(&["input"])
        .link_rel(Some("noopener noreferrer nofollow"))
        .url_schemes(["http", "https", "mailto"].into_iter().collect())
        .clean(html)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_code_render() {
        let h = markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n```rust\nfn main() {}\n```\n");
        assert!(h.contains("<table>") && h.contains("<td>1</td>"), "{h}");
        assert!(
            h.contains("<pre><code class=\"language-rust\">fn main() {}"),
            "{h}"
        );
    }

    #[test]
    fn script_and_handlers_are_removed() {
        let h = markdown("hi <img src=x onerror=alert(1)> <script>alert(2)</script> [x](javascript:alert(3)) <a href=\"https://e.com\" onclick=\"alert(4)\">y</a>");
        for bad in ["<img", "onerror", "<script", "javascript:", "onclick"] {
            assert!(!h.contains(bad), "{bad} in {h}");
        }
        assert!(h.contains("href=\"https://e.com\""), "{h}");
    }

    #[test]
    fn plain_text_is_escaped() {
        assert_eq!(plain("<b>x</b>\ny"), "<p>&lt;b&gt;x&lt;&#47;b&gt;<br>y</p>");
    }
}
