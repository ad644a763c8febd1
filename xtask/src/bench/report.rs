//! What a scenario hands back, and the report (`report.md`, `results.json`, SVG charts).
use super::env::Host;
use serde_json::{json, Value};
use std::fmt::Write;

/// A figure compared with its floor.
pub struct Floor {
    pub what: String,
    pub value: String,
    pub floor: String,
    /// None: could not be evaluated (scenario or leg not run).
    pub met: Option<bool>,
}

impl Floor {
    pub fn new(
        what: impl Into<String>,
        value: impl Into<String>,
        floor: impl Into<String>,
        met: Option<bool>,
    ) -> Floor {
        Floor {
            what: what.into(),
            value: value.into(),
            floor: floor.into(),
            met,
        }
    }
}

pub struct Section {
    pub key: &'static str,
    pub title: &'static str,
    /// Empty when it ran; otherwise why not.
    pub not_run: Option<String>,
    /// Parts that did not run (e.g. one baseline), with the reason.
    pub skipped: Vec<String>,
    pub md: String,
    pub json: Value,
    pub floors: Vec<Floor>,
    /// (file name, title, svg)
    pub charts: Vec<(String, String, String)>,
}

impl Section {
    pub fn new(key: &'static str, title: &'static str) -> Section {
        Section {
            key,
            title,
            not_run: None,
            skipped: vec![],
            md: String::new(),
            json: json!({}),
            floors: vec![],
            charts: vec![],
        }
    }

    pub fn not_run(key: &'static str, title: &'static str, why: String) -> Section {
        let mut s = Section::new(key, title);
        s.json = json!({ "status": "not run", "reason": why });
        s.not_run = Some(why);
        s
    }

    pub fn chart(&mut self, file: &str, title: &str, svg: String) {
        self.charts.push((file.to_string(), title.to_string(), svg));
    }
}

fn mark(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "**NOT MET**",
        None => "not evaluated",
    }
}

pub struct RunInfo<'a> {
    pub host: &'a Host,
    pub profile: &'a str,
    pub command: &'a str,
    pub duration_s: f64,
    pub nofile: u64,
    pub commands: &'a [String],
    pub net: &'a super::netns::BenchNet,
}

/// The Markdown report; chart links are prefixed with `chart_prefix`.
pub fn markdown(info: &RunInfo, sections: &[Section], chart_prefix: &str) -> String {
    let h = info.host;
    let mut s = String::new();
    let _ = writeln!(s, "# Spoke benchmarks — {}\n", h.date);
    let _ = writeln!(
        s,
        "`{}` ({} profile) ran on {} for {:.0} s, at commit `{}`{}. Every figure comes from this one run on this one machine: \
         Spoke and its baselines were measured back to back, never in parallel.\n",
        info.command,
        info.profile,
        h.stamp,
        info.duration_s,
        h.commit,
        if h.dirty { " (with uncommitted changes in the working tree)" } else { "" }
    );
    let _ = writeln!(s, "## Host\n\n| | |\n|---|---|");
    let _ = writeln!(s, "| CPU | {} × {} |", h.cpus, h.cpu);
    let _ = writeln!(s, "| memory | {:.1} GiB |", h.mem_gib);
    let _ = writeln!(s, "| kernel | {} |", h.kernel);
    let _ = writeln!(s, "| OS | {} |", h.os);
    let _ = writeln!(s, "| rustc | {} |", h.rustc);
    let _ = writeln!(
        s,
        "| RLIMIT_NOFILE | {} (bench and the processes it starts) |",
        info.nofile
    );
    let _ = writeln!(
        s,
        "| load average | {} at the start, {} at the end (1/5/15 min; other work on the machine skews timings) |",
        h.loadavg,
        super::env::loadavg()
    );
    let net = info.net;
    let _ = writeln!(
        s,
        "| TCP | every route runs in the bench's own network namespace with congestion control **{}**; the host's is {} with default qdisc {}{} |",
        net.congestion_control,
        net.host_congestion_control,
        net.host_qdisc,
        if net.host_congestion_control == "bbr" && net.host_qdisc != "fq" {
            " (bbr without fq paces every socket with its own timer: see the analysis)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "| commit | `{}` |\n", h.commit);
    let _ = writeln!(s, "## Figures against their floors\n\n| scenario | figure | value | floor | |\n|---|---|---|---|---|");
    for sec in sections {
        if let Some(why) = &sec.not_run {
            let _ = writeln!(s, "| {} | — | not run: {} | | |", sec.key, one_line(why));
        }
        for f in &sec.floors {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                sec.key,
                f.what,
                f.value,
                f.floor,
                if f.floor.starts_with('(') {
                    "—"
                } else {
                    mark(f.met)
                }
            );
        }
    }
    let _ = writeln!(
        s,
        "\nFor scale, upstream Konnectivity (Go) was measured at 0.07× direct bulk, +480 µs p50, 36 MiB idle RSS + 11 KiB per \
         connection, 386 tunnels/s and 0.12× on a 50 ms / 0.1% link.\n"
    );
    for sec in sections {
        let _ = writeln!(s, "## {} (`{}`)\n", sec.title, sec.key);
        if let Some(why) = &sec.not_run {
            let _ = writeln!(s, "**Not run:** {}\n", why);
            continue;
        }
        s.push_str(&sec.md);
        s.push('\n');
        for k in &sec.skipped {
            let _ = writeln!(s, "- not run: {k}");
        }
        if !sec.skipped.is_empty() {
            s.push('\n');
        }
        for (file, title, _) in &sec.charts {
            let _ = writeln!(s, "![{title}]({chart_prefix}{file})\n");
        }
    }
    let _ = writeln!(
        s,
        "## Exact commands\n\nThe bench itself:\n\n```sh\n{}\n```\n",
        info.command
    );
    let _ = writeln!(
        s,
        "Processes it started (paths under the run's temporary directory):\n\n```sh"
    );
    for c in info.commands {
        let _ = writeln!(s, "{c}");
    }
    let _ = writeln!(s, "```");
    s
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ").replace('|', "/")
}

pub fn json(info: &RunInfo, sections: &[Section]) -> Value {
    let h = info.host;
    let mut scen = serde_json::Map::new();
    for sec in sections {
        scen.insert(sec.key.to_string(), sec.json.clone());
    }
    let floors: Vec<Value> = sections
        .iter()
        .flat_map(|sec| {
            sec.floors
                .iter()
                .map(move |f| json!({"scenario": sec.key, "figure": f.what, "value": f.value, "floor": f.floor, "met": f.met}))
        })
        .collect();
    json!({
        "date": h.stamp,
        "profile": info.profile,
        "command": info.command,
        "duration_s": info.duration_s,
        "tcp": {"congestion_control": info.net.congestion_control, "host_congestion_control": info.net.host_congestion_control, "host_default_qdisc": info.net.host_qdisc},
        "host": {"cpu": h.cpu, "cpus": h.cpus, "mem_gib": h.mem_gib, "kernel": h.kernel, "os": h.os, "rustc": h.rustc, "loadavg_start": h.loadavg, "loadavg_end": super::env::loadavg()},
        "commit": h.commit,
        "dirty": h.dirty,
        "nofile": info.nofile,
        "floors": floors,
        "scenarios": scen,
        "commands": info.commands,
    })
}

/// `1234.5` → `1235`; small numbers keep digits.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
