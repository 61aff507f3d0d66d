//! Reports: a markdown table, per-class waits, CSV time series, and plots (SVG and PNG).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::stats::Report;

/// Fonts tried for plot text (Debian's fonts-dejavu-core first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No font for plot text.
    #[error("no TrueType font for plot text (install fonts-dejavu-core); tried {0:?}")]
    NoFont(&'static [&'static str]),
    /// Drawing failed.
    #[error("plot {0}: {1}")]
    Plot(String, String),
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// The comparison table (markdown).
pub fn table(reports: &[Report], lower_bound: Option<usize>) -> String {
    let mut s = String::new();
    s.push_str("| policy | acceptance | wait p50 | wait p95 | wait p99 | peak hosts | mean hosts | mean mem util | peak mem util | stranded mem | work / placement | events | wall |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        // a zero wall time was left out on purpose (--no-wall: byte-identical outputs)
        let wall = if r.wall_s > 0.0 {
            format!("{:.2} s", r.wall_s)
        } else {
            "–".to_string()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} ms | {} ms | {} ms | {} | {:.1} | {} | {} | {} | {:.1} | {} | {wall} |",
            r.policy,
            pct(r.acceptance),
            r.wait.p50,
            r.wait.p95,
            r.wait.p99,
            r.peak_hosts,
            r.mean_hosts,
            pct(r.mean_mem_util),
            pct(r.peak_mem_util),
            pct(r.mean_stranded_mem),
            r.work_per_decision,
            r.events,
        );
    }
    if let Some(lb) = lower_bound {
        let _ = writeln!(s, "| lower bound | | | | | {lb} | | | | | | | |");
    }
    s
}

/// p99 wait per size class (only classes with at least `min_samples` placements), one
/// column per policy.
pub fn class_table(reports: &[Report], min_samples: usize) -> String {
    let mut classes: Vec<u8> = reports
        .iter()
        .flat_map(|r| r.wait_by_class.keys().copied())
        .collect();
    classes.sort_unstable();
    classes.dedup();
    let mut s = String::from("| class |");
    for r in reports {
        let _ = write!(s, " {} p99 (n) |", r.policy);
    }
    s.push('\n');
    s.push_str("|---|");
    for _ in reports {
        s.push_str("---:|");
    }
    s.push('\n');
    for c in classes {
        let enough = reports
            .iter()
            .all(|r| r.wait_by_class.get(&c).is_some_and(|p| p.n >= min_samples));
        if !enough {
            continue;
        }
        let _ = write!(s, "| s{c:02} |");
        for r in reports {
            let p = r.wait_by_class[&c];
            let _ = write!(s, " {} ms ({}) |", p.p99, p.n);
        }
        s.push('\n');
    }
    s
}

/// Writes `timeseries.csv` (every policy's samples) into `dir`.
pub fn write_csv(dir: &Path, reports: &[Report]) -> Result<(), ReportError> {
    let mut s = String::from(
        "policy,t_s,hosts_in_use,cpu_util,mem_util,waiting,stranded_mem,stranded_cpu\n",
    );
    for r in reports {
        for x in &r.samples {
            let _ = writeln!(
                s,
                "{},{},{},{:.5},{:.5},{},{:.5},{:.5}",
                r.policy,
                x.t_s,
                x.hosts_in_use,
                x.cpu_util,
                x.mem_util,
                x.waiting,
                x.stranded_mem,
                x.stranded_cpu
            );
        }
    }
    let path = dir.join("timeseries.csv");
    std::fs::write(&path, s).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn register_font() -> Result<(), ReportError> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        for f in FONTS {
            if let Ok(bytes) = std::fs::read(f) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    });
    if ok {
        Ok(())
    } else {
        Err(ReportError::NoFont(FONTS))
    }
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &Series,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1e-9, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn both(
    dir: &Path,
    stem: &str,
    title: &str,
    x: &str,
    y: &str,
    series: &Series,
) -> Result<(), ReportError> {
    let svg = dir.join(format!("{stem}.svg"));
    draw(
        SVGBackend::new(&svg, (960, 540)).into_drawing_area(),
        title,
        x,
        y,
        series,
    )
    .map_err(|e| ReportError::Plot(svg.display().to_string(), e))?;
    let png = dir.join(format!("{stem}.png"));
    draw(
        BitMapBackend::new(&png, (960, 540)).into_drawing_area(),
        title,
        x,
        y,
        series,
    )
    .map_err(|e| ReportError::Plot(png.display().to_string(), e))
}

/// Writes the plots: memory utilization and hosts in use over time, wait CDFs.
#[allow(clippy::cast_precision_loss)]
pub fn write_plots(dir: &Path, reports: &[Report]) -> Result<(), ReportError> {
    register_font()?;
    let hours = |t: u64| t as f64 / 3600.0;
    let util: Series = reports
        .iter()
        .map(|r| {
            (
                r.policy.clone(),
                r.samples
                    .iter()
                    .map(|s| (hours(s.t_s), s.mem_util * 100.0))
                    .collect(),
            )
        })
        .collect();
    both(
        dir,
        "utilization",
        "Memory allocated over time",
        "hours",
        "% of memory",
        &util,
    )?;
    let hosts: Series = reports
        .iter()
        .map(|r| {
            (
                r.policy.clone(),
                r.samples
                    .iter()
                    .map(|s| (hours(s.t_s), s.hosts_in_use as f64))
                    .collect(),
            )
        })
        .collect();
    both(
        dir,
        "hosts",
        "Hosts in use over time",
        "hours",
        "hosts",
        &hosts,
    )?;
    let cdf: Series = reports
        .iter()
        .map(|r| {
            (
                r.policy.clone(),
                r.wait_cdf
                    .iter()
                    .map(|(ms, q)| (*ms as f64 / 1000.0, *q))
                    .collect(),
            )
        })
        .collect();
    both(
        dir,
        "wait_cdf",
        "Time to place (CDF)",
        "seconds from request to claim",
        "fraction placed",
        &cdf,
    )
}
