//! eBPF data plane of the agent.
//!
//! * Socket fast path: `spoke_sockops` (sock_ops on a cgroup v2 directory) tracks the agent's
//!   backend sockets, which [`Ebpf::prepare_socket`] marks by socket cookie before connect(),
//!   together with the local endpoint socket each one reaches; `spoke_msg` (sk_msg on the
//!   SockHash) then moves each side's payload straight into the other's receive queue.
//!   Nothing else is touched: unmarked sockets never enter the map.
//! * XDP guard: `spoke_xdp_guard` drops TCP to protected local ports (kubelet's 10250) unless
//!   the source is in the allowed CIDRs.
//!
//! Every attachment is a kernel link owned by this process (nothing is pinned), so dropping
//! [`Ebpf`], exiting or being SIGKILLed detaches everything; a restarted agent starts clean.
mod backlog;
mod config;
mod metrics;
mod sys;

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{links::FdLink, CgroupAttachMode, RawTracePoint, SkMsg, SockOps, Xdp, XdpMode},
    util::KernelVersion,
    EbpfLoader,
};
use serde::Serialize;
use spoke_agent_common::{SockKey, AGENT_SOCK_MARK, PRESENT};

pub use backlog::{Backlog, HeldWriter};
pub use config::{EbpfArgs, EbpfConfig, EbpfMode};
pub use metrics::EbpfCollector;

/// The kernel programs, built by `cargo xtask build-ebpf` and copied in by build.rs; empty
/// when the agent was built without the eBPF toolchain.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spoke-agent-ebpf.o"));

/// Whether a part of the data plane runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    On,
    /// Attached on some of the requested interfaces only.
    Partial,
    Off,
    /// Nothing requested (e.g. no `--xdp-guard-interfaces`).
    NotConfigured,
}

#[derive(Clone, Debug, Serialize)]
pub struct Component {
    pub state: State,
    /// Where it is attached, or why it is off.
    pub detail: String,
}

impl Component {
    fn off(why: impl Into<String>) -> Component {
        Component {
            state: State::Off,
            detail: why.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramStatus {
    /// `sock_ops`, `sk_msg` or `xdp`.
    pub program: &'static str,
    /// cgroup directory, "sockhash" or interface name.
    pub target: String,
    pub attached: bool,
    /// XDP attach mode in use (`native` or `generic`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What is attached and why the rest is off; for /readyz, the status page and logs.
#[derive(Clone, Debug, Serialize)]
pub struct EbpfStatus {
    pub mode: EbpfMode,
    /// False when this binary was built without the eBPF object.
    pub object_embedded: bool,
    pub fast_path: Component,
    pub xdp_guard: Component,
    pub programs: Vec<ProgramStatus>,
}

impl EbpfStatus {
    /// One human-readable line.
    pub fn summary(&self) -> String {
        let part = |name: &str, c: &Component| match c.state {
            State::On => format!("{name} on ({})", c.detail),
            State::Partial => format!("{name} partial ({})", c.detail),
            State::Off => format!("{name} off: {}", c.detail),
            State::NotConfigured => format!("{name} not configured ({})", c.detail),
        };
        format!(
            "eBPF mode {}: {}; {}",
            self.mode,
            part("socket fast path", &self.fast_path),
            part("XDP guard", &self.xdp_guard)
        )
    }

    /// True when every requested part is attached.
    pub fn complete(&self) -> bool {
        [&self.fast_path, &self.xdp_guard]
            .iter()
            .all(|c| matches!(c.state, State::On | State::NotConfigured))
    }
}

/// The loaded data plane. Dropping it detaches every program.
pub struct Ebpf {
    status: EbpfStatus,
    /// Socket cookies of agent sockets (`AGENT_SOCKS`); `Some` only while the fast path runs.
    agent_socks: Option<Mutex<HashMap<MapData, u64, u8>>>,
    /// The pairs' counts, read to hold a writer back from a lagging reader; `Some` only
    /// while the fast path runs.
    backlog_maps: Option<Arc<backlog::BacklogMaps>>,
    /// Endpoint ports whose legs are redirected (`--ebpf-fast-path-ports`).
    fast_path_ports: Vec<u16>,
    counters: Option<Arc<PerCpuArray<MapData, u64>>>,
    // Field order is drop order: XDP links, then the tasks, then programs and maps.
    _xdp_links: Vec<FdLink>,
    /// Reads the `WAKE` ring while the fast path runs.
    _waker: Option<Waker>,
    _logger: Option<LogForwarder>,
    _socks: Option<SockHash<MapData, SockKey>>,
    _bpf: Option<aya::Ebpf>,
}

impl std::fmt::Debug for Ebpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ebpf")
            .field("status", &self.status)
            .finish()
    }
}

impl Ebpf {
    /// Loads and attaches what `cfg` asks for. `Off` attaches nothing; `On` fails unless every
    /// requested part attached; `Auto` keeps what works and logs one line about the rest.
    pub fn load(cfg: &EbpfConfig) -> anyhow::Result<Ebpf> {
        let ebpf = Self::load_inner(cfg);
        let summary = ebpf.status.summary();
        match cfg.mode {
            EbpfMode::On if !ebpf.status.complete() => {
                anyhow::bail!("--ebpf=on but the eBPF data plane could not be set up: {summary}")
            }
            EbpfMode::Off => tracing::info!("{summary}"),
            _ if ebpf.status.complete() => tracing::info!("{summary}"),
            _ => tracing::warn!("{summary}; the userspace relay handles the rest"),
        }
        Ok(ebpf)
    }

    fn inert(status: EbpfStatus) -> Ebpf {
        Ebpf {
            status,
            agent_socks: None,
            backlog_maps: None,
            fast_path_ports: Vec::new(),
            counters: None,
            _xdp_links: Vec::new(),
            _waker: None,
            _logger: None,
            _socks: None,
            _bpf: None,
        }
    }

    fn load_inner(cfg: &EbpfConfig) -> Ebpf {
        let xdp_wanted = !cfg.xdp_guard_interfaces.is_empty();
        // No ports: nothing to redirect, so neither the redirect nor the read counter loads.
        let fast_path_wanted = !cfg.fast_path_ports.is_empty();
        let not_configured = |detail: &str| Component {
            state: State::NotConfigured,
            detail: detail.into(),
        };
        let mut status = EbpfStatus {
            mode: cfg.mode,
            object_embedded: !OBJECT.is_empty(),
            fast_path: if fast_path_wanted {
                Component::off("not loaded")
            } else {
                not_configured("no --ebpf-fast-path-ports")
            },
            xdp_guard: not_configured("no --xdp-guard-interfaces"),
            programs: Vec::new(),
        };
        let all_off = |status: &mut EbpfStatus, why: String| {
            if fast_path_wanted {
                status.fast_path = Component::off(why.clone());
            }
            if xdp_wanted {
                status.xdp_guard = Component::off(why);
            }
        };
        if cfg.mode == EbpfMode::Off {
            all_off(&mut status, "--ebpf=off".into());
            return Self::inert(status);
        }
        if !fast_path_wanted && !xdp_wanted {
            return Self::inert(status);
        }
        if OBJECT.is_empty() {
            all_off(
                &mut status,
                "this binary has no eBPF object (build with `cargo xtask build-ebpf` first)".into(),
            );
            return Self::inert(status);
        }

        sys::raise_memlock_rlimit();
        let mut bpf = match EbpfLoader::new().load(OBJECT) {
            Ok(bpf) => bpf,
            Err(e) => {
                all_off(&mut status, explain("loading the eBPF object failed", &e));
                return Self::inert(status);
            }
        };
        // Before any program loads: the programs reference the log ring buffer.
        let logger = start_log_forwarder(&mut bpf);
        let counters = bpf
            .take_map("COUNTERS")
            .and_then(|m| PerCpuArray::try_from(m).ok())
            .map(Arc::new);

        let mut ebpf = Ebpf {
            status,
            agent_socks: None,
            backlog_maps: None,
            fast_path_ports: cfg.fast_path_ports.clone(),
            counters,
            _xdp_links: Vec::new(),
            _waker: None,
            _logger: logger,
            _socks: None,
            _bpf: None,
        };

        if fast_path_wanted {
            ebpf.status.fast_path = match ebpf.attach_fast_path(&mut bpf, cfg) {
                Ok(detail) => Component {
                    state: State::On,
                    detail,
                },
                Err(why) => {
                    ebpf.unload_fast_path(&mut bpf);
                    Component::off(why)
                }
            };
        }
        if xdp_wanted {
            ebpf.status.xdp_guard = ebpf.attach_xdp(&mut bpf, cfg);
        }
        ebpf._bpf = Some(bpf);
        ebpf
    }

    /// Leaves nothing of a failed fast-path attach half attached (sk_msg without sock_ops is
    /// useless); XDP comes later, so every program listed so far is the fast path's.
    fn unload_fast_path(&mut self, bpf: &mut aya::Ebpf) {
        if let Ok(p) = program::<SkMsg>(bpf, "spoke_msg") {
            let _ = p.unload();
        }
        if let Ok(p) = program::<SockOps>(bpf, "spoke_sockops") {
            let _ = p.unload();
        }
        if let Ok(p) = program::<RawTracePoint>(bpf, "spoke_recv") {
            let _ = p.unload();
        }
        for p in &mut self.status.programs {
            p.attached = false;
        }
        self._socks = None;
        self.agent_socks = None;
        self.backlog_maps = None;
        self._waker = None;
    }

    fn attach_fast_path(
        &mut self,
        bpf: &mut aya::Ebpf,
        cfg: &EbpfConfig,
    ) -> Result<String, String> {
        // Cgroup links (5.7+) detach when the agent exits; the legacy attach would outlive it.
        if let Ok(v) = KernelVersion::current() {
            if v < KernelVersion::new(5, 15, 0) {
                return Err(format!(
                    "kernel {v:?} is older than 5.15 (needs cgroup links and netns cookies in sk_msg)"
                ));
            }
        }
        let cgroup = match cfg.cgroup_path.clone().or_else(sys::cgroup2_root) {
            Some(p) => p,
            None => return Err("no cgroup2 mount in /proc/mounts and no --cgroup-path".into()),
        };
        let cgroup_label = cgroup.display().to_string();
        let cgroup_dir =
            File::open(&cgroup).map_err(|e| format!("cannot open cgroup {cgroup_label}: {e}"))?;

        let socks: SockHash<MapData, SockKey> = bpf
            .take_map("SOCKS")
            .ok_or("object has no SOCKS map")?
            .try_into()
            .map_err(|e| explain("SOCKS map", &e))?;
        let socks_fd = socks
            .fd()
            .try_clone()
            .map_err(|e| format!("dup SOCKS fd: {e}"))?;
        self._socks = Some(socks);
        let agent_socks: HashMap<MapData, u64, u8> = bpf
            .take_map("AGENT_SOCKS")
            .ok_or("object has no AGENT_SOCKS map")?
            .try_into()
            .map_err(|e| explain("AGENT_SOCKS map", &e))?;
        let mut map = |name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| format!("object has no {name} map"))
        };
        let backlog_maps = Arc::new(backlog::BacklogMaps::new(
            map("PEERS")?
                .try_into()
                .map_err(|e| explain("PEERS map", &e))?,
            map("CONSUMED")?
                .try_into()
                .map_err(|e| explain("CONSUMED map", &e))?,
            map("WAITING")?
                .try_into()
                .map_err(|e| explain("WAITING map", &e))?,
        ));
        let wake: RingBuf<MapData> = map("WAKE")?
            .try_into()
            .map_err(|e| explain("WAKE ring buffer", &e))?;
        self._waker = Some(start_waker(wake, backlog_maps.clone()));

        // Without counting what readers consume, a redirect could queue without bound in a
        // stalled reader's socket (the kernel charges it to no receive buffer): no count, no
        // fast path.
        let recv: &mut RawTracePoint = program(bpf, "spoke_recv")?;
        recv.load()
            .map_err(|e| explain("loading the read counter that bounds redirects", &e))?;
        recv.attach("sock_recv_length").map_err(|e| {
            explain(
                "attaching the read counter to the sock_recv_length tracepoint",
                &e,
            )
        })?;
        self.status.programs.push(ProgramStatus {
            program: "raw_tracepoint",
            target: "sock_recv_length".into(),
            attached: true,
            xdp_mode: None,
            error: None,
        });

        let msg: &mut SkMsg = program(bpf, "spoke_msg")?;
        msg.load().map_err(|e| explain("loading sk_msg", &e))?;
        msg.attach(&socks_fd)
            .map_err(|e| explain("attaching sk_msg to the SockHash", &e))?;
        self.status.programs.push(ProgramStatus {
            program: "sk_msg",
            target: "sockhash".into(),
            attached: true,
            xdp_mode: None,
            error: None,
        });

        let ops: &mut SockOps = program(bpf, "spoke_sockops")?;
        ops.load().map_err(|e| explain("loading sock_ops", &e))?;
        if let Err(e) = ops.attach(&cgroup_dir, CgroupAttachMode::Single) {
            let why = explain(&format!("attaching sock_ops to {cgroup_label}"), &e);
            self.status.programs.push(ProgramStatus {
                program: "sock_ops",
                target: cgroup_label,
                attached: false,
                xdp_mode: None,
                error: Some(why.clone()),
            });
            return Err(why);
        }
        self.status.programs.push(ProgramStatus {
            program: "sock_ops",
            target: cgroup_label.clone(),
            attached: true,
            xdp_mode: None,
            error: None,
        });
        self.agent_socks = Some(Mutex::new(agent_socks));
        self.backlog_maps = Some(backlog_maps);
        let ports: Vec<String> = cfg.fast_path_ports.iter().map(u16::to_string).collect();
        Ok(format!(
            "sock_ops on {cgroup_label}, sk_msg redirect to endpoint ports {} (a leg goes to TCP while its reader lags {} MiB)",
            ports.join(","),
            spoke_agent_common::REDIRECT_BACKLOG_LIMIT >> 20
        ))
    }

    fn attach_xdp(&mut self, bpf: &mut aya::Ebpf, cfg: &EbpfConfig) -> Component {
        if let Err(why) = fill_guard_maps(bpf, cfg) {
            return Component::off(why);
        }
        let prog: &mut Xdp = match program(bpf, "spoke_xdp_guard") {
            Ok(p) => p,
            Err(why) => return Component::off(why),
        };
        if let Err(e) = prog.load() {
            return Component::off(explain("loading XDP", &e));
        }
        let mut on = Vec::new();
        let mut failed = Vec::new();
        for iface in &cfg.xdp_guard_interfaces {
            match attach_xdp_iface(prog, iface) {
                Ok((link, mode)) => {
                    tracing::info!(interface = %iface, mode, "XDP guard attached");
                    self._xdp_links.push(link);
                    on.push(format!("{iface} ({mode})"));
                    self.status.programs.push(ProgramStatus {
                        program: "xdp",
                        target: iface.clone(),
                        attached: true,
                        xdp_mode: Some(mode),
                        error: None,
                    });
                }
                Err(why) => {
                    failed.push(format!("{iface}: {why}"));
                    self.status.programs.push(ProgramStatus {
                        program: "xdp",
                        target: iface.clone(),
                        attached: false,
                        xdp_mode: None,
                        error: Some(why),
                    });
                }
            }
        }
        let ports: Vec<String> = cfg.xdp_protected_ports.iter().map(u16::to_string).collect();
        let scope = format!(
            "ports {} allowed from {} CIDR(s)",
            ports.join(","),
            cfg.xdp_allow_cidrs.len()
        );
        match (on.is_empty(), failed.is_empty()) {
            (false, true) => Component {
                state: State::On,
                detail: format!("{} guarding {scope}", on.join(", ")),
            },
            (false, false) => Component {
                state: State::Partial,
                detail: format!(
                    "{} guarding {scope}; failed: {}",
                    on.join(", "),
                    failed.join("; ")
                ),
            },
            _ => Component::off(failed.join("; ")),
        }
    }

    /// Marks `fd` (a TCP socket the agent is about to connect() to a backend at `port`) so the
    /// fast path picks up the connection. Must be called before connect(); no-op when the fast
    /// path is off or the port is not one of `--ebpf-fast-path-ports`.
    pub fn prepare_socket(&self, fd: BorrowedFd<'_>, port: u16) -> io::Result<()> {
        let Some(agent_socks) = &self.agent_socks else {
            return Ok(());
        };
        if !self.redirects_to(port) {
            return Ok(());
        }
        let cookie = sys::socket_cookie(fd)?;
        let mut map = agent_socks
            .lock()
            .map_err(|_| io::Error::other("AGENT_SOCKS lock poisoned"))?;
        map.insert(cookie, AGENT_SOCK_MARK, 0)
            .map_err(io::Error::other)
    }

    /// True if legs to endpoint `port` are redirected (`--ebpf-fast-path-ports`).
    fn redirects_to(&self, port: u16) -> bool {
        self.fast_path_ports.contains(&port)
    }

    /// What holds the agent's writes to `tcp` back while its endpoint's reader lags
    /// ([`Backlog`]); `None` when the fast path is off or `tcp`'s port is not listed.
    pub fn backlog(&self, tcp: &tokio::net::TcpStream) -> Option<Backlog> {
        let maps = self.backlog_maps.as_ref()?;
        let peer = tcp.peer_addr().ok()?;
        if !self.redirects_to(peer.port()) {
            return None;
        }
        let netns = match sys::netns_cookie(tcp.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "no network namespace cookie: the redirect's backlog goes unwatched");
                return None;
            }
        };
        let key = backlog::sock_key(netns, tcp.local_addr().ok()?, peer);
        Some(Backlog::new(maps.clone(), key))
    }

    /// True while the socket fast path is attached.
    pub fn fast_path_enabled(&self) -> bool {
        self.agent_socks.is_some()
    }

    /// Registers the `spoke_ebpf_*` metrics (read from the kernel at scrape time).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(self.collector()));
    }

    /// The collector behind [`Ebpf::register_metrics`], for callers composing registries.
    pub fn collector(&self) -> EbpfCollector {
        let attached = |name: &str| {
            let mut progs = self.status.programs.iter().filter(|p| p.program == name);
            let first = progs.next();
            first.is_some_and(|p| p.attached) && progs.all(|p| p.attached)
        };
        EbpfCollector {
            counters: self.counters.clone(),
            backlog: self.backlog_maps.clone(),
            programs: vec![
                ("sock_ops", attached("sock_ops")),
                ("sk_msg", attached("sk_msg")),
                ("raw_tracepoint", attached("raw_tracepoint")),
                ("xdp", attached("xdp")),
            ],
        }
    }

    pub fn status(&self) -> EbpfStatus {
        self.status.clone()
    }
}

fn program<'a, T>(bpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    bpf.program_mut(name)
        .ok_or_else(|| format!("object has no program {name}"))?
        .try_into()
        .map_err(|_| format!("program {name} has an unexpected type"))
}

/// Native mode where the driver supports it, generic otherwise. Only link-based attachments
/// are kept: aya falls back to a netlink attach on old kernels, which would outlive the agent.
fn attach_xdp_iface(prog: &mut Xdp, iface: &str) -> Result<(FdLink, &'static str), String> {
    let (id, mode) = match prog.attach(iface, XdpMode::Driver) {
        Ok(id) => (id, "native"),
        Err(native) => match prog.attach(iface, XdpMode::Skb) {
            Ok(id) => (id, "generic"),
            Err(generic) => {
                return Err(format!(
                    "{}; generic mode: {}",
                    explain("native mode", &native),
                    explain("", &generic)
                ))
            }
        },
    };
    let link = prog
        .take_link(id)
        .map_err(|e| explain("taking the XDP link", &e))?;
    FdLink::try_from(link)
        .map_err(|_| {
            "kernel lacks XDP links (5.9+); refusing an attachment that outlives the agent".into()
        })
        .map(|l| (l, mode))
}

fn fill_guard_maps(bpf: &mut aya::Ebpf, cfg: &EbpfConfig) -> Result<(), String> {
    let mut ports: HashMap<&mut MapData, u16, u8> = bpf
        .map_mut("PROTECTED_PORTS")
        .ok_or("object has no PROTECTED_PORTS map")?
        .try_into()
        .map_err(|e| explain("PROTECTED_PORTS map", &e))?;
    for port in &cfg.xdp_protected_ports {
        ports
            .insert(port, PRESENT, 0)
            .map_err(|e| explain("PROTECTED_PORTS insert", &e))?;
    }
    for cidr in &cfg.xdp_allow_cidrs {
        let prefix = u32::from(cidr.prefix);
        match cidr.addr {
            IpAddr::V4(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], u8> = bpf
                    .map_mut("ALLOW_V4")
                    .ok_or("object has no ALLOW_V4 map")?
                    .try_into()
                    .map_err(|e| explain("ALLOW_V4 map", &e))?;
                trie.insert(&Key::new(prefix, a.octets()), PRESENT, 0)
                    .map_err(|e| explain("ALLOW_V4 insert", &e))?;
            }
            IpAddr::V6(a) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> = bpf
                    .map_mut("ALLOW_V6")
                    .ok_or("object has no ALLOW_V6 map")?
                    .try_into()
                    .map_err(|e| explain("ALLOW_V6 map", &e))?;
                trie.insert(&Key::new(prefix, a.octets()), PRESENT, 0)
                    .map_err(|e| explain("ALLOW_V6 insert", &e))?;
            }
        }
    }
    Ok(())
}

/// An error as one status line: the cause chain, verifier logs cut short, and the missing
/// capabilities when the kernel said EPERM.
fn explain(what: &str, err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = String::from(what);
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut eperm = false;
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            eperm |= matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES));
        }
        let text = e.to_string();
        eperm |= text.contains("Operation not permitted");
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
        cur = e.source();
    }
    const MAX: usize = 400;
    if msg.len() > MAX {
        let cut = (0..=MAX)
            .rev()
            .find(|i| msg.is_char_boundary(*i))
            .unwrap_or(0);
        msg.truncate(cut);
        msg.push_str("...");
    }
    let missing = sys::missing_caps();
    if eperm && !missing.is_empty() {
        msg = format!(
            "missing {} (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN): {msg}",
            missing.join(" and ")
        );
    }
    msg
}

/// A ring buffer the programs write to, drained by a runtime task whenever it has records.
/// Without a runtime at load, or if epoll refuses it, it stays open, unread: the programs
/// are loaded against its fd, and run on without a reader.
enum RingReader<T> {
    Task(#[allow(dead_code)] tokio_util::task::AbortOnDropHandle<()>),
    Idle(#[allow(dead_code)] Box<T>),
}

impl<T: AsRawFd + Send + 'static> RingReader<T> {
    /// `unread` says what is lost while the ring is not read.
    fn start(ring: T, unread: &str, mut drain: impl FnMut(&mut T) + Send + 'static) -> Self {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime to read an eBPF ring buffer: {unread}");
            return RingReader::Idle(Box::new(ring));
        };
        let _enter = rt.enter();
        // SAFETY: the ring owns its fd, which stays open and unchanged for as long as the
        // AsyncFd owns the ring.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        };
        let mut ring = match registered {
            Ok(fd) => fd,
            Err(e) => {
                let (ring, e) = e.into_parts();
                tracing::warn!(error = %e, "cannot poll an eBPF ring buffer: {unread}");
                return RingReader::Idle(Box::new(ring));
            }
        };
        RingReader::Task(tokio_util::task::AbortOnDropHandle::new(rt.spawn(
            async move {
                while let Ok(mut ready) = ring.readable_mut().await {
                    drain(ready.get_inner_mut());
                    ready.clear_ready();
                }
            },
        )))
    }
}

/// Wakes the agent's writers held for a lagging reader when the reader's reads reach their
/// marks (`WAKE`; see `backlog`).
type Waker = RingReader<RingBuf<MapData>>;

fn start_waker(ring: RingBuf<MapData>, maps: Arc<backlog::BacklogMaps>) -> Waker {
    RingReader::start(
        ring,
        "writers held for a lagging reader wake by timer",
        move |ring| maps.wake_from(ring),
    )
}

/// Forwards the programs' aya-log records to `log`/`tracing`.
type LogForwarder = RingReader<aya_log::EbpfLogger<&'static dyn log::Log>>;

fn start_log_forwarder(bpf: &mut aya::Ebpf) -> Option<LogForwarder> {
    let logger = match aya_log::EbpfLogger::init(bpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "eBPF log forwarding unavailable");
            return None;
        }
    };
    Some(RingReader::start(
        logger,
        "the programs' log records are dropped",
        |logger| logger.flush(),
    ))
}
