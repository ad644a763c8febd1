//! klog's flags, accepted as upstream binaries accept them. Only `-v/--v` has an effect
//! (mapped to a tracing level); the rest are parsed so upstream command lines still start.
use clap::ArgAction::Set;

#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Logging (klog compatible)")]
pub struct KlogFlags {
    /// Log verbosity as klog: 0-4 info, 5-6 debug, 7+ trace.
    #[arg(short = 'v', long = "v", default_value_t = 4)]
    pub v: u8,
    #[arg(long, default_value = "", hide = true)]
    pub vmodule: String,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "true", default_missing_value = "true", hide = true)]
    pub logtostderr: bool,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true", hide = true)]
    pub alsologtostderr: bool,
    #[arg(long, default_value = "", hide = true)]
    pub log_file: String,
    #[arg(long, default_value = "1800", hide = true)]
    pub log_file_max_size: String,
    #[arg(long, default_value = "", hide = true)]
    pub log_dir: String,
    #[arg(long, default_value = "", hide = true)]
    pub stderrthreshold: String,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true", hide = true)]
    pub skip_headers: bool,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true", hide = true)]
    pub skip_log_headers: bool,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true", hide = true)]
    pub add_dir_header: bool,
    #[arg(long, action = Set, num_args = 0..=1, default_value = "false", default_missing_value = "true", hide = true)]
    pub one_output: bool,
    #[arg(long, default_value = "", hide = true)]
    pub log_backtrace_at: String,
    #[arg(long, default_value = "5s", hide = true)]
    pub log_flush_frequency: String,
    /// Log output format; default: text on a terminal, JSON otherwise.
    #[arg(long, value_enum)]
    pub log_format: Option<crate::logging::LogFormat>,
}

impl KlogFlags {
    pub fn init_logging(&self) {
        crate::logging::init(self.log_format, self.v);
    }
}
