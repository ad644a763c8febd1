//! Logging setup: `tracing` with text or JSON output and klog's `-v` levels mapped. The
//! filter can be changed at run time through the admin port (`/debug/flags/v`).
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Libraries whose debug output would drown ours; kept at info unless named explicitly.
const QUIET: &str = "h2=info,hyper=info,tower=info,rustls=info";

/// The live filter: the reload handle plus the directive it was built from.
struct Live {
    handle: reload::Handle<EnvFilter, Registry>,
    directive: Mutex<String>,
}

static LIVE: OnceLock<Live> = OnceLock::new();

/// klog verbosity (`--v`, upstream default 4) to a tracing filter: up to 4 is info,
/// 5-6 debug, above trace.
pub fn verbosity_directive(verbosity: u8) -> String {
    let level = match verbosity {
        0..=4 => "info",
        5..=6 => "debug",
        _ => "trace",
    };
    format!("{level},{QUIET}")
}

/// Installs the global subscriber. `RUST_LOG` overrides `--v`.
pub fn init(format: Option<LogFormat>, verbosity: u8) {
    let directive = std::env::var("RUST_LOG")
        .ok()
        .filter(|d| EnvFilter::try_new(d).is_ok())
        .unwrap_or_else(|| verbosity_directive(verbosity));
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = match format {
        Some(f) => f == LogFormat::Json,
        None => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    if installed.is_ok() {
        let _ = LIVE.set(Live {
            handle,
            directive: Mutex::new(directive),
        });
    }
}

/// The filter in force, e.g. `debug,h2=info,...`.
pub fn current() -> Option<String> {
    let live = LIVE.get()?;
    let directive = live.directive.lock().ok()?;
    Some(directive.clone())
}

/// Changes the filter at run time. Accepts a klog verbosity (`0`..`10`, as Kubernetes
/// components' `PUT /debug/flags/v`) or a tracing filter directive (`debug,h2=trace`).
/// Returns the directive now in force.
pub fn set(spec: &str) -> Result<String, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err("empty log level".into());
    }
    let directive = match spec.parse::<u8>() {
        Ok(v) => verbosity_directive(v),
        Err(_) => spec.to_string(),
    };
    let filter = EnvFilter::try_new(&directive)
        .map_err(|e| format!("invalid log filter {directive:?}: {e}"))?;
    let live = LIVE.get().ok_or("logging not initialised")?;
    live.handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    if let Ok(mut d) = live.directive.lock() {
        d.clone_from(&directive);
    }
    tracing::info!(filter = %directive, "log filter changed");
    Ok(directive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klog_levels_map_to_tracing_levels() {
        assert!(verbosity_directive(0).starts_with("info,"));
        assert!(verbosity_directive(4).starts_with("info,"));
        assert!(verbosity_directive(5).starts_with("debug,"));
        assert!(verbosity_directive(9).starts_with("trace,"));
    }

    #[test]
    fn set_rejects_garbage_before_init_or_after() {
        assert!(set("").is_err());
        assert!(set("debug,=[[").is_err());
    }
}
