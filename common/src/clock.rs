//! Wall-clock time for records and adverts. `placement` never reads a clock; binaries pass
//! what this returns.

use std::time::{SystemTime, UNIX_EPOCH};

use placement::Timestamp;

/// Now, as milliseconds since the Unix epoch.
pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(placement::time::duration_ms)
        .unwrap_or(0);
    Timestamp::from_millis(ms)
}
