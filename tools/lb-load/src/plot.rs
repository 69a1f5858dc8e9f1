//! A hand-written SVG chart of a load run, readable at 900×500: offered and
//! achieved request rates with failures on top (and, optionally, the number
//! of instances on a right-hand axis), p50 and p99 latency below on a log
//! scale, both over the same time axis.
//!
//! `render_svg(&report.series, &[(t, instances), ...])`: `t` in seconds
//! since the load started, the same clock as [`TimePoint::t`]; each instance
//! count holds until the next one.

use std::fmt::Write as _;

use crate::TimePoint;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = WIDTH - 72.0;
const RATE_TOP: f64 = 70.0;
const RATE_BOTTOM: f64 = 262.0;
const LAT_TOP: f64 = 320.0;
const LAT_BOTTOM: f64 = 440.0;
/// The optional metric panel, under the latency panel (the chart grows).
const METRIC_TOP: f64 = 480.0;
const METRIC_BOTTOM: f64 = 580.0;
const METRIC_HEIGHT: f64 = 640.0;

const OFFERED: &str = "#7f7f7f";
const OK: &str = "#2ca02c";
const FAILED: &str = "#d62728";
const P50: &str = "#1f77b4";
const P99: &str = "#ff7f0e";
const INSTANCES: &str = "#9467bd";
const METRIC: &str = "#8c564b";
const MARK: &str = "#17becf";
const GRID: &str = "#e6e6e6";
const AXIS: &str = "#444444";

/// The chart with a default title.
pub fn render_svg(series: &[TimePoint], extra: &[(f64, u32)]) -> String {
    render_svg_titled("lb-load", series, extra)
}

/// The chart; `extra` is `(seconds, instances)` and may be empty. A second
/// line of `title` (after a `\n`) becomes a smaller subtitle.
pub fn render_svg_titled(title: &str, series: &[TimePoint], extra: &[(f64, u32)]) -> String {
    render_svg_scaling(title, series, extra, None, &[])
}

/// A metric a scaling policy acts on, over time, against its target.
pub struct ScalingMetric<'a> {
    /// Axis title, e.g. "CPU per instance (%)".
    pub name: &'a str,
    pub target: f64,
    /// `(seconds, value)`; `None` where there was no value.
    pub points: &'a [(f64, Option<f64>)],
}

/// [`render_svg_titled`], plus, under the latency panel, `metric` against
/// its target, and scaling decisions `marks` (`(seconds, label)`) as
/// vertical lines across every panel.
pub fn render_svg_scaling(
    title: &str,
    series: &[TimePoint],
    extra: &[(f64, u32)],
    metric: Option<&ScalingMetric<'_>>,
    marks: &[(f64, String)],
) -> String {
    let (height, bottom) = if metric.is_some() { (METRIC_HEIGHT, METRIC_BOTTOM) } else { (HEIGHT, LAT_BOTTOM) };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#);
    let (title, subtitle) = title.split_once('\n').unwrap_or((title, ""));
    // Bold DejaVu Sans is about 0.62 em per character: shrink long titles to fit.
    let fit = |size: f64, text: &str| size.min((WIDTH - 24.0) / (0.62 * text.chars().count().max(1) as f64)).max(8.0);
    let style = format!(r#"font-size="{:.1}" font-weight="bold""#, fit(16.0, title));
    text(&mut svg, WIDTH / 2.0, 21.0, "middle", &style, title);
    if !subtitle.is_empty() {
        let style = format!(r#"font-size="{:.1}" fill="{AXIS}""#, fit(12.0, subtitle));
        text(&mut svg, WIDTH / 2.0, 38.0, "middle", &style, subtitle);
    }

    let t_end = series
        .iter()
        .map(|p| p.t + p.span)
        .chain(extra.iter().map(|&(t, _)| t))
        .chain(marks.iter().map(|(t, _)| *t))
        .fold(1.0_f64, f64::max);
    let x_axis = Axis::linear(0.0, t_end, LEFT, RIGHT, 10);
    let mid = |p: &TimePoint| p.t + p.span / 2.0;

    rate_panel(&mut svg, series, extra, &x_axis, mid);
    latency_panel(&mut svg, series, &x_axis, mid);
    if let Some(m) = metric {
        metric_panel(&mut svg, m, &x_axis);
    }
    for (t, label) in marks {
        let x = x_axis.at(*t);
        line(&mut svg, x, RATE_TOP, x, bottom, MARK, 1.0, r#"stroke-dasharray="2,3""#);
        text(&mut svg, x + 2.0, RATE_TOP + 11.0, "start", &format!(r#"font-size="10" fill="{MARK}""#), label);
    }

    // The shared time axis under the last panel.
    for &t in &x_axis.ticks {
        let x = x_axis.at(t);
        line(&mut svg, x, bottom, x, bottom + 4.0, AXIS, 1.0, "");
        text(&mut svg, x, bottom + 17.0, "middle", "", &fmt_num(t));
    }
    text(&mut svg, (LEFT + RIGHT) / 2.0, bottom + 40.0, "middle", "", "time since start (s)");
    svg.push_str("</svg>\n");
    svg
}

fn rate_panel(svg: &mut String, series: &[TimePoint], extra: &[(f64, u32)], x: &Axis, mid: impl Fn(&TimePoint) -> f64) {
    let top = series.iter().flat_map(|p| [p.offered_rate(), p.ok_rate(), p.failed_rate()]).fold(1.0_f64, f64::max);
    let y = Axis::linear(0.0, top, RATE_BOTTOM, RATE_TOP, 6);
    frame(svg, x, &y, RATE_TOP, RATE_BOTTOM);
    for &v in &y.ticks {
        text(svg, LEFT - 6.0, y.at(v) + 4.0, "end", "", &fmt_num(v));
    }
    vertical_title(svg, 20.0, (RATE_TOP + RATE_BOTTOM) / 2.0, "requests per second");

    let rate = |f: fn(&TimePoint) -> f64| -> Vec<Option<(f64, f64)>> {
        series.iter().map(|p| Some((x.at(mid(p)), y.at(f(p))))).collect()
    };
    // Failures as a filled area, so a few of them still catch the eye.
    let failed = rate(TimePoint::failed_rate);
    if series.iter().any(|p| p.failed > 0) {
        let mut area = format!("M{:.1},{:.1}", x.at(mid(&series[0])), y.at(0.0));
        for (px, py) in failed.iter().flatten() {
            let _ = write!(area, " L{px:.1},{py:.1}");
        }
        let _ = write!(area, " L{:.1},{:.1} Z", x.at(mid(&series[series.len() - 1])), y.at(0.0));
        let _ = writeln!(svg, r#"<path d="{area}" fill="{FAILED}" fill-opacity="0.18" stroke="none"/>"#);
    }
    polyline(svg, &rate(TimePoint::offered_rate), OFFERED, 2.0, r#"stroke-dasharray="6,4""#);
    polyline(svg, &rate(TimePoint::ok_rate), OK, 2.0, "");
    polyline(svg, &failed, FAILED, 1.5, "");

    let mut legend =
        vec![(OFFERED, "offered", r#"stroke-dasharray="6,4""#), (OK, "ok (achieved)", ""), (FAILED, "failed", "")];
    if !extra.is_empty() {
        let most = extra.iter().map(|&(_, n)| n).max().unwrap_or(0);
        let inst = Axis::linear(0.0, f64::from(most + 1), RATE_BOTTOM, RATE_TOP, 6);
        let inst = Axis { ticks: inst.ticks.into_iter().filter(|v| v.fract() == 0.0).collect(), ..inst };
        line(svg, RIGHT, RATE_TOP, RIGHT, RATE_BOTTOM, INSTANCES, 1.0, "");
        for &v in &inst.ticks {
            line(svg, RIGHT, inst.at(v), RIGHT + 4.0, inst.at(v), INSTANCES, 1.0, "");
            text(svg, RIGHT + 7.0, inst.at(v) + 4.0, "start", &format!(r#"fill="{INSTANCES}""#), &fmt_num(v));
        }
        vertical_title(svg, WIDTH - 18.0, (RATE_TOP + RATE_BOTTOM) / 2.0, "instances");
        let mut steps = extra.to_vec();
        steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut d = String::new();
        for (i, &(t, n)) in steps.iter().enumerate() {
            let (px, py) = (x.at(t), inst.at(f64::from(n)));
            if i == 0 {
                let _ = write!(d, "M{px:.1},{py:.1}");
            } else {
                let _ = write!(d, " H{px:.1} V{py:.1}");
            }
        }
        let _ = write!(d, " H{:.1}", x.at(x.max));
        let _ = writeln!(
            svg,
            r#"<path d="{d}" fill="none" stroke="{INSTANCES}" stroke-width="2.5" stroke-linejoin="round"/>"#
        );
        legend.push((INSTANCES, "instances (right axis)", ""));
    }
    legend_row(svg, RATE_TOP - 12.0, &legend);
}

fn metric_panel(svg: &mut String, m: &ScalingMetric<'_>, x: &Axis) {
    let top = m.points.iter().filter_map(|(_, v)| *v).fold(m.target * 1.5, f64::max);
    let y = Axis::linear(0.0, top, METRIC_BOTTOM, METRIC_TOP, 4);
    frame(svg, x, &y, METRIC_TOP, METRIC_BOTTOM);
    for &v in &y.ticks {
        text(svg, LEFT - 6.0, y.at(v) + 4.0, "end", "", &fmt_num(v));
    }
    vertical_title(svg, 20.0, (METRIC_TOP + METRIC_BOTTOM) / 2.0, m.name);
    let (ty, target) = (y.at(m.target), format!("target {}", fmt_num(m.target)));
    line(svg, LEFT, ty, RIGHT, ty, METRIC, 1.5, r#"stroke-dasharray="6,4""#);
    let points: Vec<Option<(f64, f64)>> = m.points.iter().map(|&(t, v)| v.map(|v| (x.at(t), y.at(v)))).collect();
    polyline(svg, &points, METRIC, 2.0, "");
    legend_row(
        svg,
        METRIC_TOP - 12.0,
        &[(METRIC, m.name, ""), (METRIC, &target, r#"stroke-dasharray="6,4""#), (MARK, "scaling decision", "")],
    );
}

fn latency_panel(svg: &mut String, series: &[TimePoint], x: &Axis, mid: impl Fn(&TimePoint) -> f64) {
    let values: Vec<f64> = series.iter().flat_map(|p| [p.p50_ms, p.p99_ms]).flatten().filter(|v| *v > 0.0).collect();
    let (lo, hi) = values.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let y = if values.is_empty() {
        Axis::log(1.0, 1000.0, LAT_BOTTOM, LAT_TOP)
    } else {
        Axis::log(lo, hi, LAT_BOTTOM, LAT_TOP)
    };
    frame(svg, x, &y, LAT_TOP, LAT_BOTTOM);
    for &v in &y.ticks {
        text(svg, LEFT - 6.0, y.at(v) + 4.0, "end", "", &fmt_num(v));
    }
    vertical_title(svg, 20.0, (LAT_TOP + LAT_BOTTOM) / 2.0, "latency (ms, log)");
    if values.is_empty() {
        let style = format!(r#"fill="{FAILED}""#);
        text(svg, (LEFT + RIGHT) / 2.0, (LAT_TOP + LAT_BOTTOM) / 2.0, "middle", &style, "no successful requests");
    }
    let curve = |f: fn(&TimePoint) -> Option<f64>| -> Vec<Option<(f64, f64)>> {
        series.iter().map(|p| f(p).filter(|v| *v > 0.0).map(|v| (x.at(mid(p)), y.at(v)))).collect()
    };
    polyline(svg, &curve(|p| p.p99_ms), P99, 2.0, "");
    polyline(svg, &curve(|p| p.p50_ms), P50, 2.0, "");
    legend_row(svg, LAT_TOP - 12.0, &[(P50, "p50 latency", ""), (P99, "p99 latency", "")]);
}

/// Maps values onto pixels, with the tick values to label.
struct Axis {
    min: f64,
    max: f64,
    from: f64,
    to: f64,
    log: bool,
    ticks: Vec<f64>,
}

impl Axis {
    /// From `min` to `max` rounded up to a tick, about `count` ticks.
    fn linear(min: f64, max: f64, from: f64, to: f64, count: usize) -> Axis {
        let step = nice_step((max - min).max(1e-9) / count as f64);
        let max = (max / step).ceil() * step;
        let ticks = (0..).map(|i| min + i as f64 * step).take_while(|v| *v <= max + step * 1e-9).collect();
        Axis { min, max, from, to, log: false, ticks }
    }

    /// Whole decades around `lo..hi`, at least one; 2 and 5 ticks too when
    /// there are at most two decades.
    fn log(lo: f64, hi: f64, from: f64, to: f64) -> Axis {
        let mut min = 10f64.powf(lo.log10().floor());
        let mut max = 10f64.powf(hi.log10().ceil());
        if max / min < 10.0 - 1e-9 {
            max = min * 10.0;
        }
        if !(min.is_finite() && max.is_finite()) || min <= 0.0 {
            (min, max) = (1.0, 1000.0);
        }
        let decades = (max / min).log10().round() as i32;
        let mut ticks = Vec::new();
        for d in 0..=decades {
            let base = min * 10f64.powi(d);
            ticks.push(base);
            if decades <= 2 && d < decades {
                ticks.extend([2.0 * base, 5.0 * base]);
            }
        }
        Axis { min, max, from, to, log: true, ticks }
    }

    fn at(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(self.min).log10() - self.min.log10()) / (self.max.log10() - self.min.log10())
        } else {
            (v - self.min) / (self.max - self.min)
        };
        self.from + f * (self.to - self.from)
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * pow).find(|s| *s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * pow)
}

/// `3`, `2.5`, `0.01`, `1000`.
fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn text(svg: &mut String, x: f64, y: f64, anchor: &str, attrs: &str, s: &str) {
    let _ = writeln!(svg, r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" {attrs}>{}</text>"#, escape(s));
}

fn vertical_title(svg: &mut String, x: f64, y: f64, s: &str) {
    let _ = writeln!(
        svg,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="middle" transform="rotate(-90 {x:.1} {y:.1})">{}</text>"#,
        escape(s)
    );
}

#[expect(clippy::too_many_arguments, reason = "an SVG line is two points and a style")]
fn line(svg: &mut String, x1: f64, y1: f64, x2: f64, y2: f64, color: &str, width: f64, attrs: &str) {
    let _ = writeln!(
        svg,
        r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{color}" stroke-width="{width}" {attrs}/>"#
    );
}

/// Grid lines at the ticks and the left and bottom axes.
fn frame(svg: &mut String, x: &Axis, y: &Axis, top: f64, bottom: f64) {
    for &t in &x.ticks {
        line(svg, x.at(t), top, x.at(t), bottom, GRID, 1.0, "");
    }
    for &v in &y.ticks {
        line(svg, LEFT, y.at(v), RIGHT, y.at(v), GRID, 1.0, "");
        line(svg, LEFT - 4.0, y.at(v), LEFT, y.at(v), AXIS, 1.0, "");
    }
    line(svg, LEFT, top, LEFT, bottom, AXIS, 1.0, "");
    line(svg, LEFT, bottom, RIGHT, bottom, AXIS, 1.0, "");
}

/// A line through the points; `None` leaves a gap.
fn polyline(svg: &mut String, points: &[Option<(f64, f64)>], color: &str, width: f64, attrs: &str) {
    let mut d = String::new();
    let mut pen_down = false;
    for p in points {
        match p {
            Some((x, y)) => {
                let _ = write!(d, "{}{x:.1},{y:.1} ", if pen_down { "L" } else { "M" });
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    if d.is_empty() {
        return;
    }
    let _ = writeln!(
        svg,
        r#"<path d="{}" fill="none" stroke="{color}" stroke-width="{width}" stroke-linejoin="round" {attrs}/>"#,
        d.trim_end()
    );
    // A lone point between gaps draws nothing as a path: mark every point.
    if points.iter().flatten().count() <= 60 {
        for (x, y) in points.iter().flatten() {
            let _ = writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="2" fill="{color}"/>"#);
        }
    }
}

fn legend_row(svg: &mut String, y: f64, entries: &[(&str, &str, &str)]) {
    let mut x = LEFT;
    for (color, label, attrs) in entries {
        line(svg, x, y - 4.0, x + 22.0, y - 4.0, color, 2.5, attrs);
        text(svg, x + 28.0, y, "start", "", label);
        // DejaVu Sans at 12 px averages about 7 px per character.
        x += 28.0 + 7.0 * label.len() as f64 + 22.0;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::FailureCounts;

    fn point(t: f64, offered: u64, ok: u64, p50: Option<f64>) -> TimePoint {
        TimePoint {
            t,
            span: 1.0,
            offered,
            ok,
            failed: offered - ok,
            failures: FailureCounts { timeout: offered - ok, ..Default::default() },
            p50_ms: p50,
            p90_ms: p50.map(|v| v * 2.0),
            p99_ms: p50.map(|v| v * 5.0),
            max_ms: p50.map(|v| v * 9.0),
            backends: BTreeMap::new(),
            delayed: 0,
        }
    }

    #[test]
    fn nice_steps_and_numbers() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(1.2), 2.0);
        assert_eq!(nice_step(33.0), 50.0);
        assert_eq!(nice_step(0.03), 0.05);
        assert_eq!(fmt_num(3.0), "3");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(0.01), "0.01");
        assert_eq!(fmt_num(1000.0), "1000");
    }

    #[test]
    fn axes_map_ends_to_pixels() {
        let a = Axis::linear(0.0, 37.0, 100.0, 0.0, 5);
        assert_eq!((a.max, a.ticks.len()), (40.0, 5));
        assert_eq!((a.at(0.0), a.at(40.0), a.at(20.0)), (100.0, 0.0, 50.0));
        let l = Axis::log(0.3, 40.0, 100.0, 0.0);
        assert_eq!((l.min, l.max), (0.1, 100.0));
        assert!((l.at(1.0) - 100.0 * 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(l.ticks.first(), Some(&0.1));
        assert_eq!(l.ticks.last(), Some(&100.0));
        let one = Axis::log(5.0, 5.0, 100.0, 0.0);
        assert_eq!((one.min, one.max), (1.0, 10.0));
    }

    #[test]
    fn chart_has_series_legend_and_axes() {
        let series = vec![
            point(0.0, 10, 10, Some(1.2)),
            point(1.0, 100, 80, Some(40.0)),
            point(2.0, 100, 0, None),
            point(3.0, 50, 50, Some(3.0)),
        ];
        let svg = render_svg_titled("ramp <test> & more\nsub", &series, &[(0.0, 1), (1.5, 2), (3.0, 3)]);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"500\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(r#"font-size="16.0" font-weight="bold">ramp &lt;test&gt; &amp; more</text>"#));
        assert!(svg.contains(">sub</text>"));
        let long = render_svg_titled(&"x".repeat(200), &series, &[]);
        assert!(long.contains(r#"font-size="8.0" font-weight="bold""#), "long titles shrink, down to 8 px");
        for label in ["offered", "ok (achieved)", "failed", "instances (right axis)", "p50 latency", "p99 latency"] {
            assert!(svg.contains(&format!(">{label}</text>")), "missing legend {label}");
        }
        for color in [OFFERED, OK, FAILED, P50, P99, INSTANCES] {
            assert!(svg.contains(&format!("stroke=\"{color}\"")), "missing {color}");
        }
        // The gap at t=2 splits each latency line in two.
        let p50 = svg.lines().find(|l| l.starts_with("<path") && l.contains(P50)).unwrap();
        assert_eq!(p50.matches('M').count(), 2, "{p50}");
        assert!(svg.contains(">time since start (s)</text>"));
        assert_eq!(svg.matches("<svg").count(), 1);
    }

    #[test]
    fn a_scaling_chart_adds_the_metric_against_its_target_and_marks_decisions() {
        let series = vec![point(0.0, 10, 10, Some(1.2)), point(1.0, 100, 100, Some(4.0))];
        let points = [(0.0, Some(20.0)), (1.0, Some(80.0)), (2.0, None)];
        let metric = ScalingMetric { name: "CPU per instance (%)", target: 50.0, points: &points };
        let marks = [(1.0, "1 -> 2".to_owned())];
        let svg = render_svg_scaling("web: cpu 50% target", &series, &[(0.0, 1)], Some(&metric), &marks);
        assert!(svg.starts_with(r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="640""#), "grows");
        for label in ["CPU per instance (%)", "target 50", "scaling decision", "1 -&gt; 2"] {
            assert!(svg.contains(&format!(">{label}</text>")), "missing {label}");
        }
        assert!(svg.contains(&format!("stroke=\"{METRIC}\"")) && svg.contains(&format!("stroke=\"{MARK}\"")));
        let plain = render_svg_titled("x", &series, &[]);
        assert!(plain.contains(r#"height="500""#) && !plain.contains(MARK), "no metric, no marks: as before");
    }

    #[test]
    fn empty_inputs_still_draw_a_chart() {
        let svg = render_svg(&[], &[]);
        assert!(svg.contains(">no successful requests</text>"));
        assert!(!svg.contains("instances"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let svg = render_svg(&[point(0.0, 5, 0, None)], &[]);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
