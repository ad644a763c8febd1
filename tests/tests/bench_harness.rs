//! `cargo xtask bench --tiny`: every scenario with a few MiB and fractions of a second, on the
//! debug binaries, so the benchmark harness cannot rot. Fails if the harness breaks or a
//! scenario that needs nothing special stops producing figures; the eBPF scenarios may record
//! "not run" with a reason (that is their documented behaviour without the kernel programs).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spoke_tests::bins::bin_dir;
use spoke_tests::netns::require_root;

fn xtask_bin() -> PathBuf {
    let path = bin_dir().join("xtask");
    if !path.is_file() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(root)
            .args(["build", "-q", "-p", "xtask"])
            .status()
            .expect("run cargo build -p xtask");
        assert!(st.success(), "cargo build -p xtask failed");
    }
    assert!(path.is_file(), "{} not found", path.display());
    path
}

/// Numbers following `"key": ` in a JSON text.
fn values(json: &str, key: &str) -> Vec<f64> {
    let pat = format!("\"{key}\": ");
    json.match_indices(&pat)
        .filter_map(|(i, _)| {
            let rest = &json[i + pat.len()..];
            let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
            rest[..end].trim().parse::<f64>().ok()
        })
        .collect()
}

#[test]
fn bench_harness_tiny_run() {
    if !require_root(
        "bench_harness_tiny_run",
        "root (network namespaces, nftables)",
        &[],
    ) {
        return;
    }
    // Make sure the binaries under test exist before starting the clock.
    let _ = (
        spoke_tests::bins::server_bin(),
        spoke_tests::bins::agent_bin(),
    );
    let xtask = xtask_bin();
    let out = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut child = Command::new(&xtask)
        .args(["bench", "--tiny", "--no-install", "--bin-dir"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start xtask bench");
    let deadline = started + Duration::from_secs(150);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("output");
            panic!(
                "xtask bench --tiny took more than 150 s\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&o.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(status.success(), "xtask bench --tiny failed: {status}");
    println!("tiny bench took {:.1} s", started.elapsed().as_secs_f64());
    assert!(stdout.contains("[bench "), "no progress lines");

    let json =
        std::fs::read_to_string(out.path().join("results.json")).expect("results.json written");
    let report = std::fs::read_to_string(out.path().join("report.md")).expect("report.md written");
    for key in [
        "\"bulk\"",
        "\"latency\"",
        "\"churn\"",
        "\"fanout\"",
        "\"fleet\"",
        "\"longfat\"",
        "\"ebpf\"",
        "\"xdp\"",
        "\"floors\"",
        "\"kernel\"",
    ] {
        assert!(json.contains(key), "results.json lacks {key}");
    }
    // Scenarios that need nothing but loopback and namespaces must have run, every Spoke
    // frontend included.
    for title in [
        "## Bulk transfer",
        "## Latency",
        "## Connection churn",
        "## Fanout",
        "## Fleet",
        "## Long fat link",
    ] {
        let at = report
            .find(title)
            .unwrap_or_else(|| panic!("report.md lacks {title}"));
        let body = &report[at..];
        let body = &body[..body[3..].find("\n## ").map(|i| i + 3).unwrap_or(body.len())];
        assert!(
            !body.contains("**Not run:**"),
            "{title} did not run:\n{body}"
        );
        assert!(
            !body.contains("- not run: spoke"),
            "a Spoke leg of {title} did not run:\n{body}"
        );
    }
    for route in [
        "spoke http-connect/uds",
        "spoke http-connect/mtls-tcp",
        "spoke grpc/uds",
        "spoke grpc/mtls-tcp",
        "direct loopback",
    ] {
        assert!(
            report.contains(&format!("| {route} | download |")),
            "bulk lacks {route} download"
        );
        assert!(
            report.contains(&format!("| {route} | upload |")),
            "bulk lacks {route} upload"
        );
    }
    let mibs = values(&json, "mib_per_s");
    assert!(mibs.len() >= 10, "expected ≥ 10 bulk figures, got {mibs:?}");
    assert!(
        mibs.iter().all(|m| *m > 0.0 && m.is_finite()),
        "bulk figures: {mibs:?}"
    );
    let p50 = values(&json, "p50_us");
    assert!(
        p50.len() >= 5 && p50.iter().all(|v| *v > 0.0),
        "latency figures: {p50:?}"
    );
    let per_s = values(&json, "per_s");
    assert!(
        per_s.len() >= 4 && per_s.iter().all(|v| *v > 0.0),
        "churn figures: {per_s:?}"
    );
    let longfat = values(&json, "ratio");
    assert!(
        longfat.iter().all(|v| *v > 0.0) && !longfat.is_empty(),
        "long fat link ratio: {longfat:?}"
    );
    // eBPF scenarios: figures or a recorded reason, never silence.
    for title in ["## eBPF fast path", "## XDP guard"] {
        assert!(report.contains(title), "report.md lacks {title}");
    }
    let svgs: Vec<_> = std::fs::read_dir(out.path())
        .expect("read out dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "svg"))
        .collect();
    assert!(svgs.len() >= 5, "expected SVG charts, found {}", svgs.len());
    for e in svgs {
        let s = std::fs::read_to_string(e.path()).expect("read svg");
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{} is not an SVG",
            e.path().display()
        );
    }
}
