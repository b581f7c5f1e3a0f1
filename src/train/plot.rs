//! The loss curve as an SVG picture: training loss per step (a line, plus its running mean
//! when the raw curve is noisy) and evaluation loss (dots), on linear axes with ticks.
//! Hand-written SVG: a few dozen lines instead of a plotting dependency.

use std::fmt::Write;

/// One named series of `(step, value)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: &'a str,
    /// Draw dots instead of a line.
    pub dots: bool,
}

/// "Nice" tick values covering `[lo, hi]` (steps of 1, 2 or 5 × 10ᵏ). Each tick is computed
/// as an integer divided (or multiplied) by a power of ten, so 2.4 is 2.4, not 2.4000000000000004.
fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / want.max(1) as f64;
    let e = raw.log10().floor() as i32;
    let m = [1.0, 2.0, 5.0, 10.0].into_iter().find(|m| span / (m * 10f64.powi(e)) <= want as f64).unwrap_or(10.0);
    let at = |k: f64| if e >= 0 { k * m * 10f64.powi(e) } else { (k * m) / 10f64.powi(-e) };
    let step = at(1.0);
    let first = (lo / step).ceil();
    (0..).map(|i| at(first + i as f64)).take_while(|&v| v <= hi + step * 1e-9).collect()
}

fn label(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{:.3}", v).trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// An SVG document plotting `series` (x: step, y: loss) under `title`.
pub fn svg(title: &str, series: &[Series]) -> String {
    svg_with_axis(title, series, None)
}

/// [`svg`], with a second series on its own right-hand axis (`axis` names it, e.g. the
/// evaluation accuracy in % beside the loss).
pub fn svg_with_axis(title: &str, series: &[Series], second: Option<(&str, &Series)>) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 64.0, if second.is_some() { 64.0 } else { 20.0 }, 36.0, 48.0);
    let all: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if let Some((_, se)) = second {
        for &(x, _) in se.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()) {
            (x0, x1) = (x0.min(x), x1.max(x));
        }
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    // Margins inside the frame, so that the first and last points (evaluation dots at step 0
    // and at the end) are not drawn on it.
    let xpad = (x1 - x0) * 0.03;
    (x0, x1) = (x0 - xpad, x1 + xpad);
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| top + (y1 - y) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, w / 2.0, escape(title));
    for t in ticks(y0, y1, 6) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            label(t)
        );
    }
    for t in ticks(x0, x1, 8) {
        let x = px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#f0f0f0"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - bottom,
            h - bottom + 16.0,
            label(t)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        w - left - right,
        h - top - bottom
    );
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, (left + w - right) / 2.0, h - 10.0);
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">loss</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    for (i, se) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = se.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if se.dots {
            for (x, y) in &pts {
                let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"/>"#, px(*x), py(*y), se.color);
            }
        } else if !pts.is_empty() {
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            let _ = writeln!(s, r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#, se.color, path.join(" "));
        }
        legend(&mut s, w - right - 150.0, top + 16.0 + 16.0 * i as f64, se.color, se.name);
    }
    if let Some((axis, se)) = second {
        let pts: Vec<(f64, f64)> = se.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let (mut lo, mut hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if pts.is_empty() || hi <= lo {
            (lo, hi) = if pts.is_empty() { (0.0, 1.0) } else { (lo - 0.5, hi + 0.5) };
        }
        let pad = (hi - lo) * 0.08;
        let (lo, hi) = (lo - pad, hi + pad);
        let qy = |y: f64| top + (hi - y) / (hi - lo) * (h - top - bottom);
        for t in ticks(lo, hi, 6) {
            let _ = writeln!(s, r#"<text x="{}" y="{:.1}" fill="{}">{}</text>"#, w - right + 6.0, qy(t) + 4.0, se.color, label(t));
        }
        let (cx, cy) = (w - 14.0, (top + h - bottom) / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{cx}" y="{cy}" text-anchor="middle" fill="{}" transform="rotate(90 {cx} {cy})">{}</text>"#,
            se.color,
            escape(axis)
        );
        if !pts.is_empty() {
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), qy(*y))).collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1" stroke-dasharray="4 3" points="{}"/>"#,
                se.color,
                path.join(" ")
            );
            for (x, y) in &pts {
                let _ = writeln!(s, r#"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="{}"/>"#, px(*x) - 3.5, qy(*y) - 3.5, se.color);
            }
        }
        legend(&mut s, w - right - 190.0, top + 16.0 + 16.0 * series.len() as f64, se.color, &format!("{} (right axis)", se.name));
    }
    s.push_str("</svg>\n");
    s
}

/// A legend entry at `(x, y)`: a swatch of `color` and `name`.
fn legend(s: &mut String, x: f64, y: f64, color: &str, name: &str) {
    let _ = writeln!(
        s,
        r#"<rect x="{x}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{y}">{}</text>"#,
        y - 4.0,
        x + 18.0,
        escape(name)
    );
}

/// A bar chart: one bar per label (`values` may be negative: bars grow from 0), the bars
/// where `highlight` holds in colour, the others grey.
pub fn bars(title: &str, xlabel: &str, ylabel: &str, labels: &[String], values: &[f64], highlight: &[bool]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 360.0, 64.0, 20.0, 36.0, 48.0);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut y0, mut y1) = finite.iter().fold((0.0f64, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.08;
    (y0, y1) = (if y0 < 0.0 { y0 - pad } else { 0.0 }, y1 + pad);
    let n = labels.len().max(1) as f64;
    let slot = (w - left - right) / n;
    let py = |y: f64| top + (y1 - y) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, w / 2.0, escape(title));
    for t in ticks(y0, y1, 6) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            label(t)
        );
    }
    // Label every bar when they fit, else every k-th.
    let every = ((n * 14.0) / (w - left - right)).ceil().max(1.0) as usize;
    for (i, (l, v)) in labels.iter().zip(values).enumerate() {
        let x = left + slot * i as f64;
        if v.is_finite() {
            let (a, b) = (py(v.max(0.0)), py(v.min(0.0)));
            let color = if highlight.get(i).copied().unwrap_or(false) { "#1f77b4" } else { "#bbbbbb" };
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{a:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                x + slot * 0.15,
                slot * 0.7,
                (b - a).max(0.5)
            );
        }
        if i % every == 0 {
            let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, x + slot / 2.0, h - bottom + 16.0, escape(l));
        }
    }
    let _ = writeln!(s, r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#444"/>"##, w - right, py(0.0), py(0.0));
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (left + w - right) / 2.0, h - 10.0, escape(xlabel));
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        escape(ylabel)
    );
    s.push_str("</svg>\n");
    s
}

/// The running mean of `points` over a window of `k` (for a noisy training curve).
pub fn smooth(points: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    let k = k.max(1);
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(k - 1);
            let w = &points[lo..=i];
            (points[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ticks() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(2.31, 2.79, 5), vec![2.4, 2.5, 2.6, 2.7]);
    }

    #[test]
    fn svg_has_every_series() {
        let train = [(1.0, 3.0), (2.0, 2.5), (3.0, f64::NAN), (4.0, 2.0)];
        let eval = [(0.0, 3.2), (4.0, 2.1)];
        let doc = svg(
            "loss <test>",
            &[
                Series { name: "train", points: &train, color: "#1f77b4", dots: false },
                Series { name: "eval", points: &eval, color: "#d62728", dots: true },
            ],
        );
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 1);
        assert_eq!(doc.matches("<circle").count(), 2);
        assert!(doc.contains("loss &lt;test&gt;"));
        assert_eq!(smooth(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)], 2), vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]);
    }

    #[test]
    fn a_second_axis_has_its_own_ticks_and_points() {
        let train = [(1.0, 0.7), (2.0, 0.6), (3.0, 0.5)];
        let acc = [(0.0, 50.0), (3.0, 80.0)];
        let doc = svg_with_axis(
            "t",
            &[Series { name: "train", points: &train, color: "#1f77b4", dots: false }],
            Some(("eval accuracy (%)", &Series { name: "eval accuracy", points: &acc, color: "#2ca02c", dots: true })),
        );
        assert!(doc.contains("eval accuracy (%)") && doc.contains("eval accuracy (right axis)"));
        assert_eq!(doc.matches(r#"width="7" height="7""#).count(), 2);
        assert!(doc.contains(">60<") && doc.contains(">80<"), "right-axis ticks in the accuracy's own range: {doc}");
    }
}
