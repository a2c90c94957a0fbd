//! A hand-written SVG line chart: time to ready (y) against guest RAM (x), one line per
//! configuration, whiskers from min to max, a legend and the machine underneath the title.

use std::fmt::Write;

/// One line of the chart: points `(x, median, min, max)`.
pub struct Series {
    pub label: String,
    pub dashed: bool,
    pub points: Vec<(f64, f64, f64, f64)>,
}

const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A 1-2-5 step giving about `n` ticks up to `max`.
pub fn tick_step(max: f64, n: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / n;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

pub fn chart(
    title: &str,
    subtitle: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> String {
    let (w, h) = (900.0, 540.0);
    let (left, right, top, bottom) = (80.0, 250.0, 70.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = all().map(|p| p.0).fold(0.0, f64::max).max(1.0);
    let y_max = all().map(|p| p.3).fold(0.0, f64::max).max(1.0);
    let (xs, ys) = (tick_step(x_max, 8.0), tick_step(y_max, 6.0));
    let (x_top, y_top) = ((x_max / xs).ceil() * xs, (y_max / ys).ceil() * ys);
    let x = |v: f64| left + v / x_top * pw;
    let y = |v: f64| top + ph - v / y_top * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="24" font-size="16" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="44" font-size="11" fill="#444">{}</text>"##,
        esc(subtitle)
    );
    // Grid and ticks.
    let mut t = 0.0;
    while t <= y_top + ys / 2.0 {
        let _ = writeln!(
            o,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y(t) + 4.0,
            num(t),
            yy = y(t)
        );
        t += ys;
    }
    let mut t = 0.0;
    while t <= x_top + xs / 2.0 {
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{}" stroke="#eee"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 18.0,
            num(t),
            xx = x(t)
        );
        t += xs;
    }
    let _ = writeln!(
        o,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 18.0,
        esc(x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(22 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        for p in &s.points {
            let _ = writeln!(
                o,
                r#"<line x1="{xx:.1}" x2="{xx:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}"/><circle cx="{xx:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                y(p.2),
                y(p.3),
                y(p.1),
                xx = x(p.0)
            );
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 28.0,
            lx + 34.0,
            ly + 4.0,
            esc(&s.label)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_one_two_five() {
        assert_eq!(tick_step(8.0, 8.0), 1.0);
        assert_eq!(tick_step(9000.0, 6.0), 2000.0);
        assert_eq!(tick_step(260.0, 6.0), 50.0);
    }

    #[test]
    fn chart_has_axes_legend_and_escapes_text() {
        let s = chart(
            "t",
            "a <b> & c",
            "guest RAM (GiB)",
            "ms",
            &[Series {
                label: "anon, 1 thread".into(),
                dashed: true,
                points: vec![(1.0, 10.0, 9.0, 12.0), (4.0, 40.0, 38.0, 41.0)],
            }],
        );
        assert!(s.starts_with("<svg"));
        assert!(s.contains("guest RAM (GiB)"));
        assert!(s.contains("anon, 1 thread"));
        assert!(s.contains("a &lt;b&gt; &amp; c"));
        assert!(s.contains("<polyline"));
        assert!(s.trim_end().ends_with("</svg>"));
    }
}
