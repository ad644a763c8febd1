//! spoke-agent: the node half of Spoke (see the library for what it does).
use clap::Parser;
use spoke_agent::options::Options;

fn main() {
    let mut opts = Options::parse();
    opts.klog.init_logging();
    spoke_process::memory::spawn_trimmer();
    // As Go's runtime does for upstream's binaries: soft open-file limit up to the hard one.
    let open_files = spoke_process::limits::raise_open_files();
    tracing::debug!(open_files, "open-file limit");
    if let Err(e) = opts.validate().and_then(|_| spoke_agent::run(opts)) {
        eprintln!("spoke-agent: {e:#}");
        std::process::exit(1);
    }
}
