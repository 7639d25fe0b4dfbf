//! Line charts as SVG, drawn on the server: no script, no library, the page's CSP unchanged.

use std::fmt::Write;

const W: f64 = 560.0;
const H: f64 = 150.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 20.0;
const TOP: f64 = 10.0;

/// A chart named `title` of `lines` (label, colour, values — all of one length), scaled to the
/// largest value, with a legend. Titles, labels and colours are the program's own constants.
pub fn lines(title: &str, lines: &[(&str, &str, Vec<f64>)]) -> String {
    let n = lines
        .iter()
        .map(|(_, _, v)| v.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let top = lines
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(0.0, f64::max);
    let scale = if top > 0.0 { top } else { 1.0 };
    let x = |i: usize| LEFT + (W - LEFT - 5.0) * i as f64 / (n - 1) as f64;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / scale);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" role=\"img\" class=\"chart\" aria-label=\"{title}\"><title>{title}</title>"
    );
    let _ = write!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{W}\" y2=\"{b}\" class=\"axis\"/>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\" class=\"axis\"/>\
         <text x=\"{tx}\" y=\"{ty}\" class=\"tick\" text-anchor=\"end\">{top}</text>\
         <text x=\"{tx}\" y=\"{b}\" class=\"tick\" text-anchor=\"end\">0</text>",
        b = H - BOTTOM,
        tx = LEFT - 4.0,
        ty = TOP + 8.0,
        top = round(top),
    );
    for (k, (label, colour, values)) in lines.iter().enumerate() {
        let pts: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" data-series=\"{label}\"/>",
            pts.join(" ")
        );
        let lx = LEFT + 8.0 + 84.0 * k as f64;
        let _ = write!(
            s,
            "<rect x=\"{lx}\" y=\"{ly}\" width=\"10\" height=\"3\" fill=\"{colour}\"/>\
             <text x=\"{tx}\" y=\"{ty}\" class=\"legend\">{label}</text>",
            ly = H - 6.0,
            tx = lx + 14.0,
            ty = H - 2.0,
        );
    }
    s.push_str("</svg>");
    s
}

fn round(v: f64) -> String {
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_per_series_scaled_to_the_largest_value() {
        let svg = lines(
            "t",
            &[
                ("a", "#000", vec![0.0, 2.0, 4.0]),
                ("b", "#111", vec![1.0, 1.0, 1.0]),
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        // The largest value touches the top, zero the bottom.
        assert!(svg.contains(&format!("{:.1},{:.1}", W - 5.0, TOP)), "{svg}");
        assert!(
            svg.contains(&format!("{:.1},{:.1}", LEFT, H - BOTTOM)),
            "{svg}"
        );
        assert!(svg.contains(">4<"), "the top value is labelled");
    }
}
