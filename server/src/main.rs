//! spoke-server: the control-plane half of Spoke (see the library for what it does).
use clap::Parser;
use spoke_server::options::Options;

fn main() {
    let mut opts = Options::parse();
    opts.klog.init_logging();
    spoke_process::memory::spawn_trimmer();
    if let Err(e) = opts.validate().and_then(|()| spoke_server::run(opts)) {
        eprintln!("spoke-server: {e:#}");
        std::process::exit(1);
    }
}
