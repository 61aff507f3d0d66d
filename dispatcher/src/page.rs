//! The status page: one self-contained HTML document that polls the JSON API.

/// The page.
pub const STATUS_PAGE: &str = include_str!("status.html");
