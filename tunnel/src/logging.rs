//! Logging setup: `tracing` with text or JSON output and klog's `-v` levels mapped.
use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// klog verbosity (`--v`, upstream default 4) to a tracing level: up to 4 is info,
/// 5-6 debug, above trace. `RUST_LOG` overrides.
pub fn init(format: Option<LogFormat>, verbosity: u8) {
    let level = match verbosity {
        0..=4 => "info",
        5..=6 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},h2=info,hyper=info,tower=info,rustls=info"
        ))
    });
    let json = match format {
        Some(f) => f == LogFormat::Json,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}
