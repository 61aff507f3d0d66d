//! Human output: tables and units. `--json` prints the API's JSON instead.

use comfy_table::{ContentArrangement, LineStyle, Table, TableStyle};

/// kubectl-like: a header rule, no borders, no lines between rows.
const PLAIN: TableStyle = TableStyle::new().header_separator(LineStyle::none().fill('─'));
use serde_json::Value;

/// A table with a header.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(PLAIN)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

/// Prints JSON, pretty.
pub fn json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// MiB as MiB/GiB/TiB.
pub fn mib(v: &Value) -> String {
    v.as_u64()
        .map(placement::resources::human_mib)
        .unwrap_or_else(|| "-".into())
}

/// "used / total" of one dimension of two resource objects.
pub fn used_of(capacity: &Value, unallocated: &Value, key: &str) -> String {
    let cap = capacity[key].as_u64().unwrap_or(0);
    let free = unallocated[key].as_u64().unwrap_or(0);
    let used = cap.saturating_sub(free);
    if key == "memory_mib" {
        format!(
            "{} / {}",
            placement::resources::human_mib(used),
            placement::resources::human_mib(cap)
        )
    } else {
        format!("{used} / {cap}")
    }
}

/// A resources object in one line.
pub fn resources(r: &Value) -> String {
    let mut s = format!(
        "{} vCPU, {}",
        r["vcpus"].as_u64().unwrap_or(0),
        mib(&r["memory_mib"])
    );
    if let Some(d) = r["disk_gib"].as_u64().filter(|d| *d > 0) {
        s.push_str(&format!(", {d} GiB disk"));
    }
    if let Some(ext) = r["extended"].as_object() {
        for (k, v) in ext {
            s.push_str(&format!(", {v} {k}"));
        }
    }
    s
}

/// Milliseconds since the epoch to a short age ("3m12s").
pub fn age(ms: &Value) -> String {
    let Some(t) = ms.as_u64() else {
        return "-".into();
    };
    let now = common::clock::now().as_millis();
    placement::time::human_duration(std::time::Duration::from_millis(now.saturating_sub(t)))
}
