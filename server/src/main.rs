//! spoke-server: the control-plane half of Spoke (see the library for what it does).
use clap::Parser;
use spoke_server::options::Options;

fn main() {
    let mut opts = Options::parse();
    opts.klog.init_logging();
    spoke_process::memory::spawn_trimmer();
    // As Go's runtime does for upstream's binaries: soft open-file limit up to the hard one.
    let open_files = spoke_process::limits::raise_open_files();
    tracing::debug!(open_files, "open-file limit");
    if let Err(e) = opts.validate().and_then(|()| spoke_server::run(opts)) {
        eprintln!("spoke-server: {e:#}");
        std::process::exit(1);
    }
}
