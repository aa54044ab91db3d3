//! SVG figures of the scenarios' records (plotters' SVG backend: text is emitted as SVG
//! `<text>`, so no font files or system libraries are needed).

use std::path::Path;

use plotters::prelude::*;

use crate::Record;

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn to_anyhow(result: DrawResult) -> anyhow::Result<()> {
    result.map_err(|e| anyhow::anyhow!("plotting: {e}"))
}

/// Draws a bar chart of labelled values.
pub fn bars(path: &Path, title: &str, y_desc: &str, bars: &[(String, f64)]) -> anyhow::Result<()> {
    to_anyhow(draw_bars(path, title, y_desc, bars))
}

fn draw_bars(path: &Path, title: &str, y_desc: &str, bars: &[(String, f64)]) -> DrawResult {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = bars.iter().map(|b| b.1).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-9) * 1.15;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), 0f64..top)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(y_desc)
        .draw()?;
    chart.draw_series(
        Histogram::vertical(&chart)
            .style(BLUE.mix(0.6).filled())
            .margin(12)
            .data(bars.iter().enumerate().map(|(i, b)| (i, if b.1.is_finite() { b.1 } else { 0.0 }))),
    )?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        Text::new(format!("{:.3}", b.1), (SegmentValue::CenterOf(i), b.1 + top * 0.02), ("sans-serif", 14))
    }))?;
    root.present()?;
    Ok(())
}

/// Draws one line per named series of (x, y) points.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    to_anyhow(draw_lines(path, title, x_desc, y_desc, series))
}

fn draw_lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = series.iter().flat_map(|s| s.1.iter());
    let (xmax, ymax) = points.fold((1e-9f64, 1e-9f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax * 1.05, 0f64..ymax * 1.15)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// The figure of a scenario's records, by scenario name.
pub fn scenario(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    let scenario = records.first().and_then(|r| r["scenario"].as_str()).unwrap_or_default();
    let num = |r: &Record, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    match scenario {
        "bulk" => {
            let mut data = Vec::new();
            for r in records.iter().filter(|r| r["kind"] == "summary") {
                let s = num(r, "streams");
                data.push((format!("direct, {s} stream(s)"), num(r, "direct_gbps")));
                data.push((format!("relayed, {s} stream(s)"), num(r, "relayed_gbps")));
            }
            bars(path, "Bulk echo goodput (median of runs)", "Gbit/s per direction", &data)
        }
        "idle-hubs" => {
            let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
            for r in records {
                let name = r["server"].as_str().unwrap_or("?").to_owned();
                let point = (num(r, "hubs"), num(r, "per_hub_kib"));
                match series.iter_mut().find(|s| s.0 == name) {
                    Some(s) => s.1.push(point),
                    None => series.push((name, vec![point])),
                }
            }
            lines(path, "Server RSS per idle hub", "registered hubs", "KiB per hub", &series)
        }
        "storm" => {
            let r = records.last().cloned().unwrap_or_default();
            let bucket = num(&r, "bucket_ms");
            let pts: Vec<(f64, f64)> = r["buckets"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .enumerate()
                        .map(|(i, v)| (i as f64 * bucket / 1000.0, v.as_f64().unwrap_or(0.0)))
                        .collect()
                })
                .unwrap_or_default();
            let title = format!(
                "Reconnects per {bucket} ms after relay restart ({} hubs, SIG{})",
                r["hubs"],
                r["signal"].as_str().unwrap_or("?")
            );
            lines(
                path,
                &title,
                "seconds after the stop signal",
                "registrations per bucket",
                &[("reconnects".into(), pts)],
            )
        }
        "churn" => {
            let mut data = Vec::new();
            for r in records {
                let m = r["mode"].as_str().unwrap_or("?");
                data.push((format!("{m} setup p50"), num(r, "setup_p50_ms")));
                data.push((format!("{m} setup p99"), num(r, "setup_p99_ms")));
                data.push((format!("{m} rtt p50"), num(r, "rtt_p50_ms")));
                data.push((format!("{m} rtt p99"), num(r, "rtt_p99_ms")));
            }
            bars(path, "Session set-up and echo RTT through the relay", "ms", &data)
        }
        other => anyhow::bail!("no plot for scenario {other:?}"),
    }
}
