//! Logging: JSON lines by default (what log pipelines in a cluster expect),
//! or text for a terminal; `RUST_LOG` overrides the level. Traces over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (a span per reconcile).

use switchyard_telemetry::Tracing;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

/// Installs the global subscriber, with the OTLP trace exporter when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Call inside the Tokio runtime.
pub fn init(format: LogFormat) -> Result<Option<Tracing>, switchyard_telemetry::TelemetryError> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime=warn,kube_client=warn"));
    switchyard_telemetry::init_subscriber("switchyard-operator", format == LogFormat::Json, filter)
}
