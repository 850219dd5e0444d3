//! The report's chart: grouped horizontal bars of median latency, one group per operation
//! (capacitor, raw, and the peers where measured), on a log scale, drawn with plotters'
//! SVG backend. A group with instruction counts (the `icount` suite) carries a marker at
//! the right: capacitor ÷ raw in instructions (and estimated cycles).

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{fmt_ns, icount_rows, rank, rows, Icounts, Medians, PEERS};
use crate::Result;

/// The series drawn, in bar order (top to bottom inside a group), with their colours.
fn series() -> Vec<(&'static str, &'static str, RGBColor)> {
    let mut s = vec![
        ("capacitor", "capacitor", RGBColor(31, 119, 180)),
        ("raw", "raw (same calls inlined)", RGBColor(150, 150, 150)),
    ];
    let colours = [
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    for ((id, title), colour) in PEERS.iter().zip(colours) {
        s.push((id, title, colour));
    }
    s
}

/// Which part of the stack a group measures, for the section labels.
fn section(group: &str) -> &'static str {
    match rank(group) {
        0..=7 => "in memory",
        8..=9 => "sled",
        10 => "redb beside sled",
        11..=12 => "Redis",
        13..=14 => "PostgreSQL",
        15..=19 => "moka → Redis → PostgreSQL",
        20 => "in memory: single-flight loads",
        _ => "other",
    }
}

const BAR: u32 = 9;
const GAP: u32 = 12;
const LABELS: u32 = 330;

/// The marker's colour.
const ICOUNT: RGBColor = RGBColor(214, 39, 40);

/// The marker of a group with instruction counts: `◆ instr 1.23× · cycles 1.40×`.
fn icount_marker(icounts: &Icounts, group: &str) -> Option<String> {
    let (_, ours, raw) = icount_rows(icounts).into_iter().find(|(g, _, _)| *g == group)?;
    let mut s = format!("◆ instr {:.2}×", ours.ir as f64 / raw.ir as f64);
    if let Some((a, b)) = ours.cycles.zip(raw.cycles) {
        s.push_str(&format!(" · est. cycles {:.2}×", a as f64 / b as f64));
    }
    Some(s)
}

/// The SVG text of the chart, or `None` when no group has both sides.
pub(crate) fn svg(medians: &Medians, icounts: &Icounts, subtitle: &str) -> Result<Option<String>> {
    let rows = rows(medians);
    if rows.is_empty() {
        return Ok(None);
    }
    let series: Vec<_> = series()
        .into_iter()
        .filter(|(id, _, _)| rows.iter().any(|(_, f)| f.contains_key(*id)))
        .collect();
    let values = rows
        .iter()
        .flat_map(|(_, f)| series.iter().filter_map(|(id, _, _)| f.get(*id).copied()));
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo.max(0.1) / 2.0, hi * 4.0);
    let n = rows.len();
    let unit = BAR * series.len() as u32 + GAP;
    let height = 120 + unit * n as u32;
    let width = 1_200;

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("capacitor: median latency per operation (log scale) — {subtitle}"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(LABELS)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..n as f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("median time per operation (lower is better)")
            .x_label_formatter(&|v| fmt_ns(*v))
            .label_style(("sans-serif", 12))
            .draw()?;

        // One band per group, top to bottom; bars inside the band in series order.
        let top = |i: usize| (n - i) as f64;
        let bar_h = 1.0 / f64::from(unit) * f64::from(BAR);
        let pad = f64::from(GAP) / f64::from(unit) / 2.0;
        for (s, (id, title, colour)) in series.iter().enumerate() {
            let bars: Vec<(f64, f64, f64)> = rows
                .iter()
                .enumerate()
                .filter_map(|(i, (_, f))| {
                    // The bar's slot: how many of the series before it this group has.
                    let slot = series[..s]
                        .iter()
                        .filter(|(id, _, _)| f.contains_key(*id))
                        .count();
                    let y1 = top(i) - pad - bar_h * slot as f64;
                    f.get(*id).map(|v| (*v, y1 - bar_h, y1))
                })
                .collect();
            let colour = *colour;
            chart
                .draw_series(
                    bars.iter()
                        .map(|&(v, y0, y1)| Rectangle::new([(lo, y0), (v, y1)], colour.filled())),
                )?
                .label(*title)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
            let value_style = ("sans-serif", 10)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center));
            chart.draw_series(bars.iter().map(|&(v, y0, y1)| {
                Text::new(
                    format!(" {}", fmt_ns(v)),
                    (v, (y0 + y1) / 2.0),
                    value_style.clone(),
                )
            }))?;
        }

        // Group labels left of the plot, and a line with the section name where it changes.
        let label_style = ("sans-serif", 12)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        let section_style = ("sans-serif", 12)
            .into_font()
            .style(FontStyle::Bold)
            .color(&RGBColor(90, 90, 90))
            .pos(Pos::new(HPos::Left, VPos::Bottom));
        let marker_style = ("sans-serif", 11)
            .into_font()
            .color(&ICOUNT)
            .pos(Pos::new(HPos::Right, VPos::Center));
        let mut last = "";
        for (i, (group, _)) in rows.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(lo, top(i) - 0.5));
            root.draw(&Text::new(group.as_str(), (x - 8, y), label_style.clone()))?;
            if let Some(marker) = icount_marker(icounts, group) {
                let (x, y) = chart.backend_coord(&(hi, top(i) - 0.5));
                root.draw(&Text::new(marker, (x - 6, y), marker_style.clone()))?;
            }
            let here = section(group);
            if here != last {
                let (x0, y0) = chart.backend_coord(&(lo, top(i)));
                let x1 = i32::try_from(width).unwrap_or(i32::MAX) - 12;
                root.draw(&PathElement::new(
                    vec![(x0 - i32::try_from(LABELS).unwrap_or(0) + 8, y0), (x1, y0)],
                    RGBColor(200, 200, 200),
                ))?;
                root.draw(&Text::new(
                    here,
                    (x0 - i32::try_from(LABELS).unwrap_or(0) + 10, y0 + 14),
                    section_style.clone(),
                ))?;
                last = here;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()?;
        root.present()?;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_is_in_its_section() {
        for (group, expected) in [
            ("l1_hit/moka/1_layer", "in memory"),
            ("write_back_set/moka", "in memory"),
            ("delete/dashmap/2_layers", "in memory"),
            ("sled_hit/moka_over_sled", "sled"),
            ("write_back_drain/sled/10000_keys", "sled"),
            ("embedded_hit/moka_over_redb", "redb beside sled"),
            ("embedded_drain/sled/10000_keys", "redb beside sled"),
            ("redis_hit/moka_over_redis", "Redis"),
            ("write_back_drain/redis/2000_keys", "Redis"),
            ("postgres_hit/moka_over_postgres", "PostgreSQL"),
            ("write_back_drain/postgres/2000_keys", "PostgreSQL"),
            ("tier3_l1_hit/x", "moka → Redis → PostgreSQL"),
            ("tier3_write_through/x", "moka → Redis → PostgreSQL"),
            ("get_or_load/64_callers", "in memory: single-flight loads"),
        ] {
            assert_eq!(section(group), expected, "{group}");
        }
    }

    #[test]
    fn draws_every_group_and_series() {
        let mut m = Medians::new();
        for (g, f, v) in [
            ("l1_hit/moka/1_layer", "capacitor", 120.0),
            ("l1_hit/moka/1_layer", "raw", 100.0),
            ("l1_hit/moka/1_layer", "foyer", 90.0),
            ("redis_hit/moka_over_redis", "capacitor", 81_000.0),
            ("redis_hit/moka_over_redis", "raw", 80_000.0),
            ("redis_hit/moka_over_redis", "hand_written", 80_500.0),
        ] {
            m.entry(g.to_owned()).or_default().insert(f.to_owned(), v);
        }
        let mut icounts = Icounts::new();
        for (side, ir, cycles) in [("capacitor", 355, 1109), ("raw", 250, 900)] {
            icounts
                .entry("l1_hit/moka/1_layer".to_owned())
                .or_default()
                .insert(
                    side.to_owned(),
                    crate::report::Count {
                        ir,
                        cycles: Some(cycles),
                    },
                );
        }
        let text = svg(&m, &icounts, "test").unwrap().unwrap();
        assert!(text.starts_with("<svg"));
        for want in [
            "l1_hit/moka/1_layer",
            "redis_hit/moka_over_redis",
            "capacitor",
            "foyer in-memory",
            "81.00 µs",
            "Redis",
            "◆ instr 1.42× · est. cycles 1.23×",
        ] {
            assert!(text.contains(want), "{want} missing");
        }
        assert!(svg(&Medians::new(), &Icounts::new(), "empty").unwrap().is_none());
    }
}
