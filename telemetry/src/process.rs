//! What both processes export about themselves on `/metrics`, besides their
//! own families: the process collector's standard families
//! (`process_open_fds`, `process_resident_memory_bytes`,
//! `process_cpu_seconds_total`, …) and `switchyard_build_info`.

use prometheus::{IntGaugeVec, Opts, Registry};

/// The source revision the binary was built from: `BUILD_REVISION` at build
/// time (the images' build argument), `unknown` otherwise.
pub const BUILD_REVISION: &str = match option_env!("BUILD_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// Registers the process collector and `switchyard_build_info{component,
/// version, revision} 1` (`component` is `gateway` or `operator`) in `registry`.
pub fn register(registry: &Registry, component: &str) -> Result<(), prometheus::Error> {
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build_info = IntGaugeVec::new(
        Opts::new(
            "switchyard_build_info",
            "1, labelled with the version and the source revision this process was built from.",
        ),
        &["component", "version", "revision"],
    )?;
    registry.register(Box::new(build_info.clone()))?;
    build_info
        .with_label_values(&[component, env!("CARGO_PKG_VERSION"), BUILD_REVISION])
        .set(1);
    Ok(())
}
