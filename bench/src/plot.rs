//! The figure of the peers benchmark (SVG, with plotters): latency CDFs of
//! the four latency workloads at the first worker count, and the rates of
//! the concurrent workloads for every variant and worker count.

use std::path::Path;

use plotters::prelude::*;

use crate::results::{Opts, Results};
use crate::servers::Variant;
use crate::workloads::Workload;

fn color(v: Variant) -> RGBColor {
    match v {
        Variant::Sticky => RGBColor(0x1f, 0x77, 0xb4),
        Variant::SocketIoSticky => RGBColor(0xd6, 0x27, 0x28),
        Variant::Nginx => RGBColor(0x2c, 0xa0, 0x2c),
        Variant::Floor => RGBColor(0x7f, 0x7f, 0x7f),
        Variant::StickyRust => RGBColor(0xff, 0x7f, 0x0e),
        Variant::StickySyn => RGBColor(0x94, 0x67, 0xbd),
        Variant::StickyCookie => RGBColor(0x17, 0xbe, 0xcf),
        Variant::StickyBpfCookie => RGBColor(0xbc, 0xbd, 0x22),
    }
}

pub fn draw(path: &Path, opts: &Opts, r: &Results) -> Result<(), String> {
    draw_svg(path, opts, r).map_err(|e| format!("cannot draw {}: {e}", path.display()))
}

fn draw_svg(path: &Path, opts: &Opts, r: &Results) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 1050)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(640);
    let workers = opts.workers[0];
    let cdfs = [
        Workload::NewConnSerial,
        Workload::NewConnConcurrent,
        Workload::LongPolling,
        Workload::WsRoundTrip,
    ];
    for (area, wl) in top.split_evenly((2, 2)).iter().zip(cdfs) {
        let series: Vec<(Variant, Vec<(f64, f64)>)> = opts
            .variants
            .iter()
            .filter_map(|&v| {
                let lat = &r.get(v, workers, wl)?.stats.latencies;
                (!lat.is_empty()).then(|| (v, cdf_points(lat)))
            })
            .collect();
        let (lo, hi) = series
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
            .fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if series.is_empty() {
            continue;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}, {workers} workers: latency CDF",
                    wl.label(wl.clients(opts.clients))
                ),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(40)
            .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("µs (log)")
            .y_desc("fraction")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for (v, pts) in series {
            let c = color(v);
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
                .label(v.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()?;
    }
    let bars = [
        Workload::NewConnConcurrent,
        Workload::LongPolling,
        Workload::Establish,
    ];
    for (area, wl) in bottom.split_evenly((1, 3)).iter().zip(bars) {
        let rates: Vec<(usize, usize, Variant, f64)> = opts
            .workers
            .iter()
            .enumerate()
            .flat_map(|(wi, &w)| {
                opts.variants
                    .iter()
                    .enumerate()
                    .filter_map(move |(vi, &v)| Some((wi, vi, v, r.get(v, w, wl)?.stats.rate())))
            })
            .collect();
        let top_rate = rates.iter().map(|x| x.3).fold(1.0, f64::max) * 1.1;
        let groups = opts.workers.len() as f64;
        let n = opts.variants.len() as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{} per second: {} (colors as in the CDFs)",
                    wl.unit(),
                    wl.label(wl.clients(opts.clients))
                ),
                ("sans-serif", 13),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..groups, 0f64..top_rate)?;
        let worker_counts = opts.workers.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_labels(worker_counts.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                match worker_counts.get(i) {
                    Some(w) if (x - x.floor() - 0.5).abs() < 0.01 => format!("{w} workers"),
                    _ => String::new(),
                }
            })
            .draw()?;
        chart.draw_series(rates.iter().map(|&(wi, vi, v, rate)| {
            let x0 = wi as f64 + 0.1 + 0.8 * vi as f64 / n;
            let x1 = x0 + 0.8 / n * 0.9;
            Rectangle::new([(x0, 0.0), (x1, rate)], color(v).filled())
        }))?;
    }
    root.present()?;
    Ok(())
}

/// (latency µs, fraction at or below it), at most ~400 points.
fn cdf_points(sorted_ns: &[u64]) -> Vec<(f64, f64)> {
    let n = sorted_ns.len();
    let step = (n / 400).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (sorted_ns[i] as f64 / 1e3, (i + 1) as f64 / n as f64))
        .collect();
    pts.push((sorted_ns[n - 1] as f64 / 1e3, 1.0));
    pts
}
