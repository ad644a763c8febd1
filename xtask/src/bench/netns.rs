//! Network namespaces for the bench, and an emulated long fat link between two of them.
//!
//! Nothing is ever added to the root namespace: links are created inside a namespace, and every
//! namespace is deleted by its guard (and leftovers of a crashed run are removed at start).
//! The long fat link is a pair of TUN devices, one per namespace, joined by a userspace
//! relay that holds every packet a fixed delay (25 or 50 ms) before handing it to the other
//! side: real per-packet delay on one end-to-end TCP connection (this kernel has no netem
//! qdisc). Loss is an nftables `numgen random` rule inside the namespaces.
use super::env::run;
use anyhow::{bail, Context, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PREFIX: &str = "spoke-bench";

/// Runs `f` on a fresh thread inside namespace `ns` (network namespaces are per thread).
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: valid namespace fd; changes only this thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes namespaces of earlier bench runs whose process is gone.
pub fn remove_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// A /24 not used by any address of the root namespace (e.g. `10.213.0`).
pub fn free_net(avoid: &[&str]) -> Result<String> {
    let used = run("ip", &["-o", "addr"])?;
    let routes = run("ip", &["route"]).unwrap_or_default();
    for cand in [
        "10.213.0",
        "10.213.1",
        "10.231.7",
        "10.231.8",
        "172.29.77",
        "172.29.78",
    ] {
        let pre = format!("{cand}.");
        if !used.contains(&pre) && !routes.contains(&pre) && !avoid.contains(&cand) {
            return Ok(cand.to_string());
        }
    }
    bail!("no free private /24 among the candidates")
}

/// A named namespace with `lo` up; deleted on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(role: &str) -> Result<Ns> {
        let name = format!("{PREFIX}-{}-{role}", std::process::id());
        let _ = run("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // A new namespace copies the root namespace's congestion control, not its creator's.
        if let Some(cc) = BENCH_CC.get() {
            let cc = cc.clone();
            in_ns(&ns.name, move || {
                std::fs::write(CC, &cc).with_context(|| format!("set {CC} to {cc}"))
            })?;
        }
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let file = std::env::temp_dir().join(format!("{}-{}.nft", self.name, std::process::id()));
        std::fs::write(&file, ruleset)?;
        super::procs::record(format!(
            "ip netns exec {} nft -f <<'EOF'\n{}EOF",
            self.name, ruleset
        ));
        let r = self.exec(&["nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        r.map(|_| ())
    }

    /// Packet counter of the nftables rule carrying `comment`.
    pub fn nft_counter(&self, comment: &str) -> u64 {
        let Ok(out) = self.exec(&["nft", "list", "ruleset"]) else {
            return 0;
        };
        out.lines()
            .filter(|l| l.contains(comment))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.iter()
                    .position(|x| *x == "packets")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("WARNING: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// The namespace the whole bench runs in, entered by the main thread before any other thread
/// starts (threads and processes inherit it): its own loopback, with one TCP congestion control
/// for every route, also in the namespaces scenarios create ([`Ns::new`]). The host's own
/// setting is recorded for the report.
pub struct BenchNet {
    _ns: Ns,
    _allowed: Option<AllowedForRun>,
    /// What every route in the bench ran with.
    pub congestion_control: String,
    /// The root namespace's setting and default qdisc, for the report.
    pub host_congestion_control: String,
    pub host_qdisc: String,
}

const CC: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// The congestion control of the bench's namespace, set in every namespace the bench creates.
static BENCH_CC: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

/// Outside the root namespace only the congestion controls in the root's allowed list can be
/// chosen (some hosts allow just `reno bbr`, and then writing `cubic` in a namespace fails
/// with EPERM). One not listed is added for the run and the list restored afterwards, through
/// a descriptor opened in the root namespace (the bench's own shows the file read-only).
struct AllowedForRun {
    file: std::fs::File,
    before: String,
}

impl AllowedForRun {
    fn ensure(cc: &str) -> Result<Option<AllowedForRun>> {
        use std::os::unix::fs::FileExt;
        let before = sysctl(ALLOWED);
        if before.split_whitespace().any(|a| a == cc) {
            return Ok(None);
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(ALLOWED)
            .with_context(|| format!("open {ALLOWED} to add {cc}"))?;
        file.write_at(format!("{before} {cc}").as_bytes(), 0)
            .with_context(|| format!("add {cc} to {ALLOWED} (it reads {before:?})"))?;
        eprintln!("[bench] {cc} added to {ALLOWED} for this run (was {before:?})");
        Ok(Some(AllowedForRun { file, before }))
    }
}

impl Drop for AllowedForRun {
    fn drop(&mut self) {
        use std::os::unix::fs::FileExt;
        if let Err(e) = self.file.write_at(self.before.as_bytes(), 0) {
            eprintln!(
                "WARNING: could not restore {ALLOWED} to {:?}: {e}",
                self.before
            );
        }
    }
}

impl BenchNet {
    /// Creates the namespace, moves the calling thread into it and sets `cc` there (`host`:
    /// the root namespace's).
    pub fn enter(cc: &str) -> Result<BenchNet> {
        let host_congestion_control = sysctl(CC);
        let host_qdisc = sysctl("/proc/sys/net/core/default_qdisc");
        let want = if cc == "host" {
            host_congestion_control.clone()
        } else {
            cc.to_string()
        };
        let available = sysctl("/proc/sys/net/ipv4/tcp_available_congestion_control");
        if !available.split_whitespace().any(|a| a == want) {
            bail!("--congestion-control {want:?} is not available here (available: {available})");
        }
        let allowed = AllowedForRun::ensure(&want)?;
        // Set first, so that `Ns::new` writes it into this namespace as into every other.
        if BENCH_CC.set(want.clone()).is_err() {
            bail!("the bench's network namespace was entered twice");
        }
        let ns = Ns::new("net")?;
        enter(&format!("/run/netns/{}", ns.name))?;
        // /proc/sys/net shows the namespace of the thread that opens it: this one's now.
        let got = sysctl(CC);
        if got != want {
            bail!("{CC} reads {got:?} after writing {want:?}");
        }
        Ok(BenchNet {
            _ns: ns,
            _allowed: allowed,
            congestion_control: want,
            host_congestion_control,
            host_qdisc,
        })
    }
}

/// A veth pair created inside `a` with one end moved to `b`, addressed and up.
pub fn veth(a: &Ns, a_if: &str, a_addr: &str, b: &Ns, b_if: &str, b_addr: &str) -> Result<()> {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    for (ns, dev, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates TUN device `name` inside namespace `ns`; the fd keeps it alive.
fn tun(ns: &str, name: &str) -> Result<OwnedFd> {
    tun_device(ns, name, libc::IFF_TUN, 0)
}

/// Creates TAP device `name` inside namespace `ns`, its fd non-blocking: the kernel then
/// receives each written frame the way a NIC driver receives its RX ring (a page-sized
/// buffer, native XDP before any skb exists; `tun_build_skb`).
pub fn tap(ns: &str, name: &str) -> Result<OwnedFd> {
    tun_device(ns, name, libc::IFF_TAP, libc::O_NONBLOCK)
}

fn tun_device(ns: &str, name: &str, kind: libc::c_int, open_flags: libc::c_int) -> Result<OwnedFd> {
    let name = name.to_string();
    in_ns(ns, move || {
        let flags = libc::O_RDWR | libc::O_CLOEXEC | open_flags;
        // SAFETY: plain open of a device node.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), flags) };
        if fd < 0 {
            bail!("open /dev/net/tun: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifr = [0u8; 40];
        let n = name.len().min(15);
        ifr[..n].copy_from_slice(&name.as_bytes()[..n]);
        let flags = (kind | libc::IFF_NO_PI) as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: ifr is a valid, large enough ifreq buffer.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
            bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    })
}

/// Point-to-point link between two namespaces with a fixed one-way delay, relayed in userspace.
pub struct DelayLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Packets relayed each way (a→b, b→a).
    pub relayed: [Arc<std::sync::atomic::AtomicU64>; 2],
}

impl DelayLink {
    /// TUN `dev` in both namespaces, `a_ip` ↔ `b_ip` (/32 peers), `delay` each way.
    pub fn new(
        a: &Ns,
        a_ip: &str,
        b: &Ns,
        b_ip: &str,
        dev: &str,
        delay: Duration,
    ) -> Result<DelayLink> {
        let fa = Arc::new(tun(&a.name, dev)?);
        let fb = Arc::new(tun(&b.name, dev)?);
        for (ns, me, peer) in [(a, a_ip, b_ip), (b, b_ip, a_ip)] {
            ns.ip(&["addr", "add", me, "peer", &format!("{peer}/32"), "dev", dev])?;
            ns.ip(&[
                "link",
                "set",
                dev,
                "mtu",
                "1500",
                "txqueuelen",
                "10000",
                "up",
            ])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let relayed: [Arc<std::sync::atomic::AtomicU64>; 2] = Default::default();
        let mut threads = Vec::new();
        for (i, (from, to)) in [(fa.clone(), fb.clone()), (fb, fa)].into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !s.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: from.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                        continue;
                    }
                    // SAFETY: buf is writable for its length.
                    let n =
                        unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n > 0
                        && tx
                            .send((Instant::now() + delay, buf[..n as usize].to_vec()))
                            .is_err()
                    {
                        break;
                    }
                }
            }));
            let s = stop.clone();
            let count = relayed[i].clone();
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let Ok((due, pkt)) = rx.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    // SAFETY: pkt is readable for its length.
                    unsafe { libc::write(to.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Ok(DelayLink {
            stop,
            threads,
            relayed,
        })
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
