//! The PNG chart: one bar panel per headline figure. Text needs a TrueType font read
//! at run time (Debian's fonts-dejavu-core, installed by bench/scripts/install-peers.sh);
//! without one the bars are drawn without any text.

use std::path::Path;

use plotters::prelude::*;

/// One panel: a title and (label, value) bars; `None` values are left out.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub bars: Vec<(String, Option<f64>)>,
    /// Logarithmic value axis (for latencies that differ by orders of magnitude).
    pub log: bool,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The same colour for a system in every panel.
fn color_of(label: &str, i: usize) -> RGBColor {
    let k = if label.starts_with("carebus") {
        0
    } else if label == "NATS default" {
        1
    } else if label == "NATS sync" {
        2
    } else if label == "RabbitMQ" {
        3
    } else {
        4 + i % 2
    };
    COLORS[k % COLORS.len()]
}

/// Loads and registers the font; `false` if there is none (draw without text).
pub fn load_font(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    // plotters keeps a reference for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

/// Draws the panels in a grid of two columns into `out`.
pub fn draw(out: &Path, title: &str, panels: &[Panel], text: bool) -> anyhow::Result<()> {
    let rows = panels.len().div_ceil(2).max(1);
    let height = u32::try_from(60 + rows * 380).unwrap_or(1200);
    let root = BitMapBackend::new(out, (1400, height)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    let body = if text {
        root.titled(title, ("sans-serif", 26))
            .map_err(|e| anyhow::anyhow!("chart: {e}"))?
    } else {
        root.margin(40, 0, 0, 0)
    };
    let areas = body.split_evenly((rows, 2));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let bars: Vec<(String, f64)> = panel
            .bars
            .iter()
            .filter_map(|(l, v)| {
                v.filter(|v| v.is_finite() && (!panel.log || *v > 0.0))
                    .map(|v| (l.clone(), v))
            })
            .collect();
        // A log axis is drawn as log10 of the values on a linear axis from a floor
        // below the smallest value; labels show the real values.
        let floor = if panel.log {
            bars.iter()
                .map(|(_, v)| v.log10())
                .fold(f64::INFINITY, f64::min)
                .floor()
                - 1.0
        } else {
            0.0
        };
        let floor = if floor.is_finite() { floor } else { 0.0 };
        let y = |v: f64| if panel.log { v.log10() } else { v };
        let max = bars.iter().map(|(_, v)| y(*v)).fold(floor, f64::max);
        let top = if max > floor {
            floor + (max - floor) * 1.15
        } else {
            floor + 1.0
        };
        let n = bars.len().max(1);
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder
                .caption(&panel.title, ("sans-serif", 20))
                .x_label_area_size(70)
                .y_label_area_size(80);
        }
        let mut chart = builder
            .build_cartesian_2d(0f64..n as f64, floor..top)
            .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
        if text {
            let labels: Vec<String> = bars.iter().map(|(l, _)| l.clone()).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n * 2 + 1)
                .x_label_formatter(&|x| {
                    let i = x.floor();
                    if (x - i - 0.5).abs() < 1e-6 {
                        labels.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .x_label_style(("sans-serif", 13))
                .y_label_formatter(&|y| {
                    if panel.log {
                        short(10f64.powf(*y))
                    } else {
                        short(*y)
                    }
                })
                .draw()
                .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
        }
        for (i, (l, v)) in bars.iter().enumerate() {
            let x = i as f64;
            let color = color_of(l, i);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.15, floor), (x + 0.85, y(*v))],
                    color.filled(),
                )))
                .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
            if text {
                chart
                    .draw_series(std::iter::once(Text::new(
                        short(*v),
                        (x + 0.3, y(*v) + (top - floor) * 0.02),
                        ("sans-serif", 14),
                    )))
                    .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
            }
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    Ok(())
}

/// 1234567 → "1.23M", 45678 → "45.7k", 1.5 → "1.50".
pub fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
