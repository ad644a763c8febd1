//! Replays inputs through a harness without libFuzzer:
//! `cargo run --example replay -- <target> <file|dir>...` (`SPOKE_FUZZ_STRICT=1` for
//! the known-bug checks).
use spoke_fuzz::harness;

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("usage: replay <target> <file|dir>...");
    let run: fn(&[u8]) = match target.as_str() {
        "packets_server" => harness::packets_server,
        "packets_agent" => harness::packets_agent,
        "http_connect" => harness::http_connect,
        "http2" => harness::http2,
        "hpack" => harness::hpack,
        "identifiers" => harness::identifiers,
        "flags" => harness::flags,
        other => panic!("unknown target {other}"),
    };
    for path in args {
        let path = std::path::PathBuf::from(path);
        let files: Vec<_> = if path.is_dir() {
            std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        } else {
            vec![path]
        };
        for f in files {
            println!("{}", f.display());
            run(&std::fs::read(&f).unwrap());
        }
    }
}
