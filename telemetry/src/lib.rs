//! Traces for the gateway and the operator. When `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set (the standard variable; `OTEL_SERVICE_NAME` and the other
//! `OTEL_*` settings of the OTLP exporter apply too), spans from `tracing`
//! are exported over OTLP/HTTP (protobuf) in batches; otherwise nothing is
//! added and tracing costs what it did before. Trace context crosses process
//! boundaries as W3C `traceparent`/`tracestate` headers.

pub mod process;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The variable that turns exporting on.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration (a bad endpoint, say).
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Keeps the exporter alive; [`Tracing::shutdown`] flushes what is buffered.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "trace exporter did not shut down cleanly");
        }
    }
}

/// The exporting layer for `service`, when [`ENDPOINT_VAR`] is set. Must be
/// called inside a Tokio runtime (the batch exporter runs on it).
#[allow(clippy::type_complexity)]
pub fn otlp_layer<S>(
    service: &'static str,
) -> Result<Option<(Box<dyn Layer<S> + Send + Sync>, Tracing)>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if std::env::var_os(ENDPOINT_VAR).is_none() {
        return Ok(None);
    }
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map_err(|err| TelemetryError::Exporter(err.to_string()))?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("switchyard");
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).boxed();
    Ok(Some((layer, Tracing { provider })))
}

/// Installs the process's subscriber: `filter`, log lines on stderr (JSON
/// objects, or text for a terminal), and the OTLP layer for `service` when
/// [`ENDPOINT_VAR`] is set. Call inside the Tokio runtime.
pub fn init_subscriber(
    service: &'static str,
    json: bool,
    filter: tracing_subscriber::EnvFilter,
) -> Result<Option<Tracing>, TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = if json {
        lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed()
    } else {
        lines.boxed()
    };
    let (otel, tracing) = match otlp_layer(service)? {
        Some((layer, tracing)) => (Some(layer), Some(tracing)),
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(otel)
        .init();
    Ok(tracing)
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the trace context in `headers` (`traceparent`),
/// if there is one. Without an exporter this does nothing.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let context = TraceContextPropagator::new().extract(&Headers(headers));
    // Fails only when the span is disabled or already started elsewhere.
    let _ = span.set_parent(context);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_endpoint_no_layer() {
        // The test environment has no OTLP endpoint.
        if std::env::var_os(ENDPOINT_VAR).is_none() {
            let layer = otlp_layer::<tracing_subscriber::Registry>("test").expect("no error");
            assert!(layer.is_none());
        }
    }
}
