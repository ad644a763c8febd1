//! spoke-agent: the node half of Spoke (see the library for what it does).
use clap::Parser;
use spoke_agent::options::Options;

fn main() {
    let mut opts = Options::parse();
    opts.klog.init_logging();
    spoke_process::memory::spawn_trimmer();
    if let Err(e) = opts.validate().and_then(|_| spoke_agent::run(opts)) {
        eprintln!("spoke-agent: {e:#}");
        std::process::exit(1);
    }
}
