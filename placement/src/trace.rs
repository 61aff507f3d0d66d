//! Workload traces, parsed a line at a time (callers stream files; nothing here reads one).
//!
//! Two formats:
//! * the Azure 2017 VM trace as shipped in `traces/` (header
//!   `arrival_s,lifetime_s,vcpus,memory_mib,censored,lifetime_bin,batch_id`);
//! * updraft's simple format: `arrival_s,lifetime_s,vcpus,memory_mib[,disk_gib]`, one VM per
//!   line, `#` starts a comment, a header line `arrival_s,...` is optional.

use serde::{Deserialize, Serialize};

/// Header of the Azure trace files.
pub const AZURE_HEADER: &str =
    "arrival_s,lifetime_s,vcpus,memory_mib,censored,lifetime_bin,batch_id";

/// One VM of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRow {
    /// Seconds from the trace start.
    pub arrival_s: u64,
    /// Seconds it lives (0: created and deleted within one tick).
    pub lifetime_s: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB (the Azure trace has none).
    pub disk_gib: u64,
    /// Still running when the trace ends (its lifetime is the time left).
    pub censored: bool,
    /// The VMs one tenant created in one tick share it (Azure `batch_id`; the simple format
    /// has none).
    pub batch: Option<u64>,
}

/// The line format of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// The Azure 2017 trace.
    Azure,
    /// updraft's simple format.
    Simple,
}

/// A line that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl TraceFormat {
    /// The resolution of the format's arrival stamps, in seconds: the Azure trace stamps a VM
    /// with the 5-minute tick it was created in; the simple format with its second.
    pub fn tick_s(self) -> u64 {
        match self {
            TraceFormat::Azure => 300,
            TraceFormat::Simple => 1,
        }
    }

    /// Picks the format from a file's first line.
    pub fn detect(first_line: &str) -> TraceFormat {
        if first_line.trim() == AZURE_HEADER {
            TraceFormat::Azure
        } else {
            TraceFormat::Simple
        }
    }

    /// Parses one line; `Ok(None)` for headers, blanks and comments.
    pub fn parse(self, line_no: usize, line: &str) -> Result<Option<TraceRow>, TraceError> {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("arrival_s") {
            return Ok(None);
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let err = |message: String| TraceError {
            line: line_no,
            message,
        };
        let num = |i: usize, name: &str| -> Result<u64, TraceError> {
            f.get(i)
                .ok_or_else(|| err(format!("missing {name}")))?
                .parse::<u64>()
                .map_err(|e| err(format!("{name}: {e}")))
        };
        let need = match self {
            TraceFormat::Azure => 7,
            TraceFormat::Simple => 4,
        };
        if f.len() < need {
            return Err(err(format!(
                "expected at least {need} fields, got {}",
                f.len()
            )));
        }
        let (censored, disk, batch) = match self {
            TraceFormat::Azure => (num(4, "censored")? == 1, 0, Some(num(6, "batch_id")?)),
            TraceFormat::Simple => (
                false,
                if f.len() > 4 { num(4, "disk_gib")? } else { 0 },
                None,
            ),
        };
        let vcpus = u32::try_from(num(2, "vcpus")?).map_err(|_| err("vcpus: too large".into()))?;
        Ok(Some(TraceRow {
            arrival_s: num(0, "arrival_s")?,
            lifetime_s: num(1, "lifetime_s")?,
            vcpus,
            memory_mib: num(3, "memory_mib")?,
            disk_gib: disk,
            censored,
            batch,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_rows() {
        let f = TraceFormat::detect(AZURE_HEADER);
        assert_eq!(f, TraceFormat::Azure);
        assert_eq!(f.parse(1, AZURE_HEADER), Ok(None));
        let r = f.parse(2, "300,900,8,14336,0,3,12").unwrap().unwrap();
        assert_eq!(
            r,
            TraceRow {
                arrival_s: 300,
                lifetime_s: 900,
                vcpus: 8,
                memory_mib: 14336,
                disk_gib: 0,
                censored: false,
                batch: Some(12)
            }
        );
        assert!(
            f.parse(3, "300,900,8,14336,1,3,12")
                .unwrap()
                .unwrap()
                .censored
        );
        let e = f.parse(4, "300,x,8,1,0,3,1").unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.starts_with("lifetime_s"), "{e}");
        assert!(f.parse(5, "1,2,3").is_err());
        let e = f.parse(6, "300,900,8,14336,0,3,x").unwrap_err();
        assert!(e.message.starts_with("batch_id"), "{e}");
    }

    #[test]
    fn simple_rows() {
        let f = TraceFormat::detect("0,60,2,4096");
        assert_eq!(f, TraceFormat::Simple);
        assert_eq!(f.parse(1, "# a comment"), Ok(None));
        assert_eq!(f.parse(2, "   "), Ok(None));
        let r = f.parse(3, "10, 60, 2, 4096, 40 # web").unwrap().unwrap();
        assert_eq!((r.arrival_s, r.disk_gib, r.batch), (10, 40, None));
        assert!(f.parse(4, "10,60,-2,4096").is_err());
    }
}
