//! Hand-written SVG bar charts: no fonts or system libraries needed, a few KiB each.
use std::fmt::Write;

/// One bar: label, value, and whether it is a baseline (drawn grey).
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub baseline: bool,
}

impl Bar {
    pub fn new(label: impl Into<String>, value: f64, baseline: bool) -> Self {
        Self {
            label: label.into(),
            value,
            baseline,
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A horizontal bar chart. `floor` draws a dashed reference line with its label.
pub fn bars(title: &str, unit: &str, bars: &[Bar], floor: Option<(f64, &str)>) -> String {
    let (w, label_w, row, top) = (820.0, 300.0, 24.0, 44.0);
    let plot_w = w - label_w - 90.0;
    let h = top + row * bars.len() as f64 + 36.0;
    let max = bars
        .iter()
        .map(|b| b.value)
        .chain(floor.map(|f| f.0))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let x = |v: f64| label_w + (v.max(0.0) / max) * plot_w;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = write!(
        s,
        r##"<text x="{}" y="38" fill="#555">{}</text>"##,
        label_w,
        esc(unit)
    );
    for (i, b) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let color = if b.baseline { "#9e9e9e" } else { "#1f77b4" };
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y + 15.0,
            esc(&b.label)
        );
        if b.value.is_finite() {
            let bw = (x(b.value) - label_w).max(1.0);
            let _ = write!(
                s,
                r#"<rect x="{label_w}" y="{}" width="{bw:.1}" height="{}" fill="{color}"/>"#,
                y + 3.0,
                row - 6.0
            );
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}">{}</text>"#,
                label_w + bw + 5.0,
                y + 15.0,
                fmt_value(b.value)
            );
        } else {
            let _ = write!(
                s,
                r##"<text x="{}" y="{}" fill="#a00">not run</text>"##,
                label_w + 5.0,
                y + 15.0
            );
        }
    }
    if let Some((v, label)) = floor {
        let fx = x(v);
        let y2 = top + row * bars.len() as f64;
        let _ = write!(
            s,
            r##"<line x1="{fx:.1}" y1="{}" x2="{fx:.1}" y2="{y2}" stroke="#d62728" stroke-dasharray="5,3"/>"##,
            top - 4.0
        );
        let _ = write!(
            s,
            r##"<text x="{fx:.1}" y="{}" fill="#d62728" text-anchor="middle">{}</text>"##,
            y2 + 16.0,
            esc(label)
        );
    }
    s.push_str("</svg>\n");
    s
}
