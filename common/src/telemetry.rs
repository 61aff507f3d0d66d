//! Tracing and metrics setup. Only binaries call this; libraries only emit.

use std::io::IsTerminal;
use std::net::SocketAddr;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable (a terminal).
    Pretty,
    /// One JSON object per line (systemd, log shippers).
    Json,
}

/// Installs the global subscriber. The filter comes from `UPDRAFT_LOG` (e.g.
/// `info,node_agent=debug`), default `info`. Format: JSON unless stderr is a terminal, or
/// forced by `UPDRAFT_LOG_FORMAT=json|pretty`.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_env("UPDRAFT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match std::env::var("UPDRAFT_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("pretty") => LogFormat::Pretty,
        _ if std::io::stderr().is_terminal() => LogFormat::Pretty,
        _ => LogFormat::Json,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// Metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(String);

/// Installs the Prometheus recorder. With `listen`, also serves `/metrics` there (the
/// node-agent); without, the caller serves [`PrometheusHandle::render`] itself (the
/// dispatcher's HTTP API). Call once per process.
pub fn install_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, MetricsError> {
    let builder = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 300.0,
        ])
        .map_err(|e| MetricsError(e.to_string()))?;
    match listen {
        Some(addr) => {
            let recorder = builder
                .with_http_listener(addr)
                .build()
                .map_err(|e| MetricsError(e.to_string()))?;
            let (recorder, exporter) = recorder;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| MetricsError(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::warn!(error = ?e, "metrics listener stopped");
                }
            });
            Ok(handle)
        }
        None => builder
            .install_recorder()
            .map_err(|e| MetricsError(e.to_string())),
    }
}
