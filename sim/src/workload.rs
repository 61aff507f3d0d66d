//! Workloads, streamed one arrival at a time: a trace file (the Azure 2017 CSV or updraft's
//! simple format, optionally gzip-compressed) or a seeded synthetic generator.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use placement::Resources;
use placement::trace::{TraceFormat, TraceRow};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Millis;

/// One VM request of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// Sequence number (unique within the workload, in arrival order).
    pub seq: u64,
    /// When it is requested.
    pub at: Millis,
    /// How long it runs once placed.
    pub lifetime: Millis,
    /// Its size.
    pub resources: Resources,
}

/// A workload that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The file cannot be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line does not parse.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: placement::trace::TraceError,
    },
    /// Arrivals go back in time.
    #[error(
        "{path}: line {line}: arrival {at_s} s is before the previous one; traces must be sorted by arrival"
    )]
    Unsorted {
        /// The file.
        path: PathBuf,
        /// Line.
        line: usize,
        /// The arrival.
        at_s: u64,
    },
}

/// How the VMs a trace stamps with one tick are replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TickArrivals {
    /// Each at its stamp, in file order: every VM of a tick in the same instant (the Azure
    /// trace's hundreds at once: the worst case for any scheduler, and not what happened).
    Instant,
    /// At seeded uniform times inside its tick (up to the next stamp, so the order of ticks
    /// holds), the VMs of one batch (Azure `batch_id`: one tenant's, created together) at the
    /// same instant.
    Spread {
        /// Seeds the draws.
        seed: u64,
    },
}

/// Streams a trace file.
pub struct TraceReader {
    path: PathBuf,
    lines: std::io::Lines<BufReader<Box<dyn Read>>>,
    format: Option<TraceFormat>,
    line: usize,
    seq: u64,
    last_s: u64,
    limit: Option<u64>,
    /// With `TickArrivals::Spread`, the draws.
    spread: Option<ChaCha8Rng>,
    /// The current tick's arrivals, in time order, not yet handed out (`seq` is set as each is).
    ready: std::collections::VecDeque<Arrival>,
    /// The first row of the next tick, read while looking for the end of this one.
    carry: Option<TraceRow>,
}

impl std::fmt::Debug for TraceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceReader")
            .field("path", &self.path)
            .field("line", &self.line)
            .finish()
    }
}

impl TraceReader {
    /// Opens `path` (`.gz` is decompressed on the fly); at most `limit` arrivals.
    pub fn open(
        path: &Path,
        limit: Option<u64>,
        ticks: TickArrivals,
    ) -> Result<TraceReader, WorkloadError> {
        let file = File::open(path).map_err(|source| WorkloadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            Box::new(file)
        };
        Ok(TraceReader {
            path: path.to_path_buf(),
            lines: BufReader::with_capacity(1 << 16, raw).lines(),
            format: None,
            line: 0,
            seq: 0,
            last_s: 0,
            limit,
            spread: match ticks {
                TickArrivals::Instant => None,
                TickArrivals::Spread { seed } => {
                    Some(ChaCha8Rng::seed_from_u64(seed ^ 0x7469_636b_7370_7264))
                }
            },
            ready: std::collections::VecDeque::new(),
            carry: None,
        })
    }

    fn row(&mut self) -> Option<Result<TraceRow, WorkloadError>> {
        loop {
            let text = match self.lines.next()? {
                Ok(t) => t,
                Err(source) => {
                    return Some(Err(WorkloadError::Io {
                        path: self.path.clone(),
                        source,
                    }));
                }
            };
            self.line += 1;
            let format = *self
                .format
                .get_or_insert_with(|| TraceFormat::detect(&text));
            match format.parse(self.line, &text) {
                Ok(Some(r)) if r.arrival_s < self.last_s => {
                    return Some(Err(WorkloadError::Unsorted {
                        path: self.path.clone(),
                        line: self.line,
                        at_s: r.arrival_s,
                    }));
                }
                Ok(Some(r)) => {
                    self.last_s = r.arrival_s;
                    return Some(Ok(r));
                }
                Ok(None) => continue,
                Err(source) => {
                    return Some(Err(WorkloadError::Parse {
                        path: self.path.clone(),
                        source,
                    }));
                }
            }
        }
    }
}

impl TraceReader {
    /// Reads the next tick (every row with the next stamp) into `ready`, each VM at its drawn
    /// time; `None` at the end of the file.
    fn read_tick(&mut self) -> Option<Result<(), WorkloadError>> {
        let first = match self.carry.take() {
            Some(r) => r,
            None => match self.row()? {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            },
        };
        let mut rows = vec![first];
        let next_s = loop {
            match self.row() {
                None => break None,
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(r)) if r.arrival_s == first.arrival_s => rows.push(r),
                Some(Ok(r)) => {
                    let s = r.arrival_s;
                    self.carry = Some(r);
                    break Some(s);
                }
            }
        };
        let tick_s = self.format.map_or(1, TraceFormat::tick_s);
        let tick_end = first.arrival_s.saturating_add(tick_s);
        let end_s = next_s.map_or(tick_end, |n| n.min(tick_end));
        let width = end_s
            .saturating_sub(first.arrival_s)
            .saturating_mul(1000)
            .max(1);
        let start = first.arrival_s.saturating_mul(1000);
        let mut batches: std::collections::HashMap<u64, Millis> = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let at = match self.spread.as_mut() {
                None => start,
                Some(rng) => match row.batch {
                    Some(b) => *batches
                        .entry(b)
                        .or_insert_with(|| start.saturating_add(rng.random_range(0..width))),
                    None => start.saturating_add(rng.random_range(0..width)),
                },
            };
            out.push(arrival(&row, at));
        }
        out.sort_by_key(|a| a.at);
        self.ready.extend(out);
        Some(Ok(()))
    }
}

/// A trace row as an arrival at `at` (its `seq` is set when it is handed out).
fn arrival(row: &TraceRow, at: Millis) -> Arrival {
    Arrival {
        seq: 0,
        at,
        // a VM created and deleted within one 5-minute tick: give it half a tick
        lifetime: if row.lifetime_s == 0 {
            150_000
        } else {
            row.lifetime_s.saturating_mul(1000)
        },
        resources: Resources::new(row.vcpus, row.memory_mib, row.disk_gib),
    }
}

impl Iterator for TraceReader {
    type Item = Result<Arrival, WorkloadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.limit.is_some_and(|l| self.seq >= l) {
            return None;
        }
        if self.ready.is_empty()
            && let Err(e) = self.read_tick()?
        {
            return Some(Err(e));
        }
        let mut a = self.ready.pop_front()?;
        a.seq = self.seq;
        self.seq += 1;
        Some(Ok(a))
    }
}

/// How arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Arrivals {
    /// A Poisson process at the given rate.
    Poisson,
    /// On/off: 10 % of the time at 5× the rate, the rest at the rate that keeps the mean.
    Bursty,
}

/// A named mix of shapes (vCPUs, MiB) with weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mix {
    /// The shapes and frequencies of the Azure 2017 trace (mostly 1–2 vCPU).
    Azure,
    /// A harder mix with many large shapes (up to 32 vCPU / 256 GiB).
    Large,
}

impl Mix {
    /// (weight, vCPUs, memory MiB).
    pub fn shapes(self) -> &'static [(u32, u32, u64)] {
        match self {
            Mix::Azure => &[
                (30, 1, 768),
                (24, 1, 1792),
                (20, 2, 3584),
                (10, 4, 7168),
                (13, 8, 14336),
                (3, 16, 57344),
            ],
            Mix::Large => &[
                (20, 1, 2048),
                (20, 2, 8192),
                (15, 4, 16384),
                (15, 8, 32768),
                (12, 16, 65536),
                (10, 16, 131072),
                (5, 32, 131072),
                (3, 32, 262144),
            ],
        }
    }
}

/// A synthetic workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SyntheticSpec {
    /// Requests to generate.
    pub requests: u64,
    /// Mean arrivals per second.
    pub rate_per_s: f64,
    /// Arrival process.
    pub arrivals: Arrivals,
    /// Shape mix.
    pub mix: Mix,
    /// Mean lifetime, seconds (log-normal with σ = 1, so the median is ~0.6 of the mean).
    pub mean_lifetime_s: f64,
    /// Seed.
    pub seed: u64,
}

/// Streams a synthetic workload.
#[derive(Debug)]
pub struct Synthetic {
    spec: SyntheticSpec,
    rng: ChaCha8Rng,
    seq: u64,
    t_s: f64,
    total_weight: u32,
}

impl Synthetic {
    /// A generator for `spec`.
    pub fn new(spec: SyntheticSpec) -> Synthetic {
        let total_weight = spec.mix.shapes().iter().map(|s| s.0).sum();
        Synthetic {
            rng: ChaCha8Rng::seed_from_u64(spec.seed),
            spec,
            seq: 0,
            t_s: 0.0,
            total_weight,
        }
    }

    /// An exponential draw with `mean` (inverse transform).
    fn exp(&mut self, mean: f64) -> f64 {
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        -mean * u.ln()
    }

    /// A standard normal draw (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // non-negative, bounded
fn ms(seconds: f64) -> Millis {
    (seconds.max(0.0) * 1000.0).round() as Millis
}

impl Iterator for Synthetic {
    type Item = Result<Arrival, WorkloadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.seq >= self.spec.requests {
            return None;
        }
        let rate = match self.spec.arrivals {
            Arrivals::Poisson => self.spec.rate_per_s,
            Arrivals::Bursty => {
                // bursts in the first 10 % of every 10-minute period
                if self.t_s % 600.0 < 60.0 {
                    self.spec.rate_per_s * 5.0
                } else {
                    self.spec.rate_per_s * 5.0 / 9.0
                }
            }
        };
        self.t_s += self.exp(1.0 / rate.max(1e-9));
        let mut pick = self.rng.random_range(0..self.total_weight);
        let mut shape = self.spec.mix.shapes()[0];
        for s in self.spec.mix.shapes() {
            if pick < s.0 {
                shape = *s;
                break;
            }
            pick -= s.0;
        }
        // log-normal with sigma 1: mean = exp(mu + 1/2)
        let mu = self.spec.mean_lifetime_s.max(1.0).ln() - 0.5;
        let lifetime_s = (mu + self.normal()).exp();
        let a = Arrival {
            seq: self.seq,
            at: ms(self.t_s),
            lifetime: ms(lifetime_s).max(1000),
            resources: Resources::new(shape.1, shape.2, 0),
        };
        self.seq += 1;
        Some(Ok(a))
    }
}

/// Either kind of workload.
#[derive(Debug)]
pub enum Workload {
    /// A trace file.
    Trace(Box<TraceReader>),
    /// A generator.
    Synthetic(Box<Synthetic>),
}

impl Iterator for Workload {
    type Item = Result<Arrival, WorkloadError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Workload::Trace(t) => t.next(),
            Workload::Synthetic(s) => s.next(),
        }
    }
}

/// How to make a workload again (each policy run streams it afresh).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum WorkloadSpec {
    /// A trace, with an optional limit on arrivals.
    Trace {
        /// The file.
        path: PathBuf,
        /// At most this many arrivals.
        limit: Option<u64>,
        /// How a tick's VMs are replayed.
        ticks: TickArrivals,
    },
    /// A generator.
    Synthetic(SyntheticSpec),
}

impl WorkloadSpec {
    /// Opens a fresh stream.
    pub fn open(&self) -> Result<Workload, WorkloadError> {
        Ok(match self {
            WorkloadSpec::Trace { path, limit, ticks } => {
                Workload::Trace(Box::new(TraceReader::open(path, *limit, *ticks)?))
            }
            WorkloadSpec::Synthetic(s) => Workload::Synthetic(Box::new(Synthetic::new(s.clone()))),
        })
    }

    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            WorkloadSpec::Trace { path, limit, ticks } => format!(
                "trace {}{}, {}",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                limit.map(|l| format!(" (first {l})")).unwrap_or_default(),
                match ticks {
                    TickArrivals::Instant => "each tick's VMs at once".to_string(),
                    TickArrivals::Spread { seed } => {
                        format!("each tick's batches spread over it (seed {seed})")
                    }
                }
            ),
            WorkloadSpec::Synthetic(s) => format!(
                "synthetic {:?} {:?} mix, {} requests at {}/s, mean lifetime {} s, seed {}",
                s.arrivals, s.mix, s.requests, s.rate_per_s, s.mean_lifetime_s, s.seed
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_both_trace_formats_and_gzip() {
        let dir = tempdir();
        let azure = dir.join("a.csv");
        std::fs::write(
            &azure,
            format!(
                "{}\n0,900,8,14336,0,3,0\n300,0,1,768,1,0,1\n",
                placement::trace::AZURE_HEADER
            ),
        )
        .unwrap();
        let rows: Vec<Arrival> = TraceReader::open(&azure, None, TickArrivals::Instant)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].resources, Resources::new(8, 14336, 0));
        assert_eq!(rows[1].at, 300_000);
        assert_eq!(rows[1].lifetime, 150_000, "a zero lifetime is half a tick");

        let simple = dir.join("s.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&simple).unwrap(),
            flate2::Compression::fast(),
        );
        writeln!(gz, "# a comment\n0,60,2,4096,20\n5,60,4,8192").unwrap();
        gz.finish().unwrap();
        let rows: Vec<Arrival> = TraceReader::open(&simple, Some(1), TickArrivals::Instant)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            rows,
            vec![Arrival {
                seq: 0,
                at: 0,
                lifetime: 60_000,
                resources: Resources::new(2, 4096, 20)
            }]
        );
    }

    #[test]
    fn a_ticks_batches_spread_over_it_together() {
        let dir = tempdir();
        let p = dir.join("a.csv");
        // tick 0: batch 7 (three VMs) and batch 8 (one); tick 300: batch 9; then a stamp only
        // 100 s later, which bounds tick 300's spread
        std::fs::write(
            &p,
            format!(
                "{}\n0,900,1,1024,0,3,7\n0,900,2,1024,0,3,8\n0,900,1,1024,0,3,7\n0,900,1,1024,0,3,7\n300,60,4,1024,0,3,9\n400,60,8,1024,0,3,10\n",
                placement::trace::AZURE_HEADER
            ),
        )
        .unwrap();
        let read = |ticks| -> Vec<Arrival> {
            TraceReader::open(&p, None, ticks)
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let instant = read(TickArrivals::Instant);
        assert_eq!(
            instant.iter().map(|a| a.at).collect::<Vec<_>>(),
            vec![0, 0, 0, 0, 300_000, 400_000]
        );
        let a = read(TickArrivals::Spread { seed: 3 });
        assert_eq!(a, read(TickArrivals::Spread { seed: 3 }), "seeded");
        assert_ne!(a, read(TickArrivals::Spread { seed: 4 }));
        assert_eq!(a.len(), 6);
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at), "sorted");
        assert!(a.iter().enumerate().all(|(i, x)| x.seq == i as u64));
        // batch 7 arrives together, inside tick 0
        let batch7: Vec<Millis> = a
            .iter()
            .filter(|x| x.resources.vcpus == 1)
            .map(|x| x.at)
            .collect();
        assert_eq!(batch7.len(), 3);
        assert!(batch7.iter().all(|t| *t == batch7[0] && *t < 300_000));
        let at = |vcpus: u32| a.iter().find(|x| x.resources.vcpus == vcpus).unwrap().at;
        assert!(at(2) < 300_000);
        assert!((300_000..400_000).contains(&at(4)), "up to the next stamp");
        assert!(
            (400_000..700_000).contains(&at(8)),
            "the last tick: a whole tick"
        );
        // a limit counts arrivals as they come out, in time order
        let first2: Vec<Arrival> = TraceReader::open(&p, Some(2), TickArrivals::Spread { seed: 3 })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(first2, a[..2].to_vec());
    }

    #[test]
    fn bad_traces_say_where() {
        let dir = tempdir();
        let p = dir.join("bad.csv");
        std::fs::write(&p, "10,60,1,512\n5,60,1,512\n").unwrap();
        let err = TraceReader::open(&p, None, TickArrivals::Instant)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert!(err.to_string().contains("line 2"), "{err}");
        std::fs::write(&p, "10,60,x,512\n").unwrap();
        let err = TraceReader::open(&p, None, TickArrivals::Instant)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert!(err.to_string().contains("vcpus"), "{err}");
        assert!(TraceReader::open(&dir.join("missing.csv"), None, TickArrivals::Instant).is_err());
    }

    #[test]
    fn synthetic_is_seeded_and_sorted() {
        let spec = SyntheticSpec {
            requests: 500,
            rate_per_s: 10.0,
            arrivals: Arrivals::Bursty,
            mix: Mix::Large,
            mean_lifetime_s: 600.0,
            seed: 7,
        };
        let a: Vec<Arrival> = Synthetic::new(spec.clone()).map(Result::unwrap).collect();
        let b: Vec<Arrival> = Synthetic::new(spec.clone()).map(Result::unwrap).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 500);
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        let c: Vec<Arrival> = Synthetic::new(SyntheticSpec { seed: 8, ..spec })
            .map(Result::unwrap)
            .collect();
        assert_ne!(a, c);
    }

    fn tempdir() -> PathBuf {
        tempfile::tempdir().unwrap().keep()
    }
}
