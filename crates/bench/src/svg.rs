//! The `--svg` chart of `usernet-bench`: one group of horizontal bars per metric, one bar per
//! setup, written by hand (no plotting crate).
//!
//! Layout: a title and subtitle, a legend (one colour per setup), then the groups stacked
//! top to bottom. Within a group every bar is scaled to the group's largest value, so bars
//! compare setups on one metric, never metrics with each other. Each bar is labelled with the
//! table's text: the value and its ratio to usernet's (`(0.85x)`), or why it is missing.

use std::fmt::Write;

/// One bar: a setup's median on a metric, or why there is none.
pub struct Bar {
    pub setup: String,
    pub value: Option<f64>,
    pub ratio: Option<f64>,
    /// The label: the value with its ratio, or "n/a (...)" / "failed: ...".
    pub text: String,
}

/// The bars of one metric.
pub struct Group {
    pub title: String,
    pub bars: Vec<Bar>,
}

const WIDTH: u32 = 980;
const NAME_WIDTH: u32 = 110;
const BAR_MAX: f64 = 520.0;
const BAR_HEIGHT: u32 = 14;
const BAR_STEP: u32 = 18;
const TITLE_STEP: u32 = 20;
const GROUP_GAP: u32 = 14;
const COLOURS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#9467bd", "#8c564b"];

/// Escapes text for an SVG text node or attribute.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn colour(setups: &[&str], name: &str) -> &'static str {
    let i = setups.iter().position(|s| *s == name).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

/// Draws the chart. `setups` fixes the legend and the colours, in order.
pub fn render(title: &str, subtitle: &str, setups: &[&str], groups: &[Group]) -> String {
    let header = 78u32;
    let body: u32 = groups.iter().map(|g| TITLE_STEP + BAR_STEP * g.bars.len() as u32 + GROUP_GAP).sum();
    let height = header + body + 10;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="10" y="24" font-size="18" font-weight="bold">{}</text>"#, escape(title));
    let _ = writeln!(out, r##"<text x="10" y="44" fill="#444">{}</text>"##, escape(subtitle));
    let mut x = 10u32;
    for name in setups {
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="56" width="12" height="12" fill="{}"/><text x="{}" y="66">{}</text>"#,
            colour(setups, name),
            x + 16,
            escape(name)
        );
        x += 30 + 8 * name.len() as u32;
    }

    let mut y = header;
    for g in groups {
        let _ = writeln!(out, r#"<text x="10" y="{}" font-weight="bold">{}</text>"#, y + 14, escape(&g.title));
        y += TITLE_STEP;
        let max = g.bars.iter().filter_map(|b| b.value).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
        for b in &g.bars {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                NAME_WIDTH - 6,
                y + BAR_HEIGHT - 3,
                escape(&b.setup)
            );
            let len = match b.value {
                Some(v) if max > 0.0 && v.is_finite() && v > 0.0 => (v / max * BAR_MAX).max(1.0),
                _ => 0.0,
            };
            if len > 0.0 {
                let _ = writeln!(
                    out,
                    r#"<rect x="{NAME_WIDTH}" y="{y}" width="{len:.1}" height="{BAR_HEIGHT}" fill="{}"/>"#,
                    colour(setups, &b.setup)
                );
            }
            let fill = if b.value.is_some() { "#000" } else { "#888" };
            let weight = if b.ratio.is_some() { r#" font-weight="bold""# } else { "" };
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}" fill="{fill}"{weight}>{}</text>"#,
                NAME_WIDTH as f64 + len + 6.0,
                y + BAR_HEIGHT - 3,
                escape(&b.text)
            );
            y += BAR_STEP;
        }
        y += GROUP_GAP;
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_scaled_bars_and_escapes_text() {
        let groups = vec![Group {
            title: "TCP <ns->host> & more".into(),
            bars: vec![
                Bar { setup: "usernet".into(), value: Some(10.0), ratio: None, text: "10.00".into() },
                Bar { setup: "pasta".into(), value: Some(5.0), ratio: Some(0.5), text: "5.00 (0.50x)".into() },
                Bar { setup: "veth".into(), value: None, ratio: None, text: "n/a (kernel only)".into() },
            ],
        }];
        let svg = render("t", "s", &["usernet", "pasta", "veth"], &groups);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("TCP &lt;ns-&gt;host&gt; &amp; more"));
        assert!(svg.contains(r#"width="520.0""#), "the largest bar fills the scale");
        assert!(svg.contains(r#"width="260.0""#), "half the value, half the bar");
        assert!(svg.contains("5.00 (0.50x)"));
        assert!(svg.contains("n/a (kernel only)"));
        // Every opened element is closed: a crude well-formedness check.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }
}
