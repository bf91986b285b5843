//! The server variants under test, each started fresh on a free port and
//! stopped (every process it started, by pid) when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    /// `sticky run` with the Node.js workers (session learning, its default).
    Sticky,
    /// `@socket.io/sticky` 1.0.4 on Node's cluster, with the cluster adapter.
    SocketIoSticky,
    /// nginx `ip_hash` with keep-alive upstreams, one port per worker.
    Nginx,
    /// Node's cluster, SCHED_NONE: one shared listening socket, no stickiness.
    Floor,
    /// `sticky run` with the Rust socketioxide worker.
    StickyRust,
    /// Diagnostic, not run by default: `sticky run --placement syn` with
    /// the Node.js workers, i.e. sticky's listeners balanced at SYN time
    /// with no stickiness. Against `Floor` it isolates the shared accept
    /// queue; against `Sticky`, the cost of placement by sid.
    StickySyn,
    /// `sticky run --placement cookie` with the Node.js workers: every
    /// connection placed by sid in softirq, no user-space step.
    StickyCookie,
    /// `sticky run --placement bpf-cookie` with the Node.js workers:
    /// sticky's own SYN cookies, placed like `StickyCookie` with every TCP
    /// option kept. Only where the kernel has the kfunc
    /// (`host::kernel_has_bpf_cookie`): elsewhere sticky falls back to
    /// rotation, which this label would misname.
    StickyBpfCookie,
}

impl Variant {
    /// What `cargo xtask bench` runs (`StickyBpfCookie` where the kernel
    /// has its kfunc: `peers::default_variants`).
    pub const DEFAULT: [Variant; 7] = [
        Variant::Sticky,
        Variant::StickyCookie,
        Variant::StickyBpfCookie,
        Variant::SocketIoSticky,
        Variant::Nginx,
        Variant::Floor,
        Variant::StickyRust,
    ];
    pub const ALL: [Variant; 8] = [
        Variant::Sticky,
        Variant::SocketIoSticky,
        Variant::Nginx,
        Variant::Floor,
        Variant::StickyRust,
        Variant::StickySyn,
        Variant::StickyCookie,
        Variant::StickyBpfCookie,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Variant::Sticky => "sticky",
            Variant::SocketIoSticky => "@socket.io/sticky",
            Variant::Nginx => "nginx ip_hash",
            Variant::Floor => "cluster, no stickiness (floor)",
            Variant::StickyRust => "sticky, Rust workers",
            Variant::StickySyn => "sticky --placement syn (no stickiness)",
            Variant::StickyCookie => "sticky --placement cookie",
            Variant::StickyBpfCookie => "sticky --placement bpf-cookie",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Variant::Sticky => "sticky",
            Variant::SocketIoSticky => "socketio_sticky",
            Variant::Nginx => "nginx",
            Variant::Floor => "floor",
            Variant::StickyRust => "sticky_rust",
            Variant::StickySyn => "sticky_syn",
            Variant::StickyCookie => "sticky_cookie",
            Variant::StickyBpfCookie => "sticky_bpf_cookie",
        }
    }

    /// The process whose CPU time is the cost of the variant's front (the
    /// supervisor, the cluster master, nginx).
    pub fn front(self) -> &'static str {
        match self {
            Variant::Sticky
            | Variant::StickyRust
            | Variant::StickySyn
            | Variant::StickyCookie
            | Variant::StickyBpfCookie => "sticky supervisor",
            Variant::SocketIoSticky => "cluster master",
            Variant::Nginx => "nginx (all processes)",
            Variant::Floor => "cluster master",
        }
    }

    pub fn parse(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.key() == name)
    }
}

/// What the variants run.
pub struct Programs {
    pub sticky: PathBuf,
    pub rust_worker: PathBuf,
    /// `bench/peers`, with `server.js` and its node_modules.
    pub peers: PathBuf,
    pub nginx: Option<PathBuf>,
}

impl Programs {
    fn server_js(&self) -> PathBuf {
        self.peers.join("server.js")
    }
}

/// A started process, in its own process group, its stderr kept.
struct Proc {
    child: Child,
    what: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `cmd`; lines on its stdout go to `ready` if given.
    fn spawn(
        mut cmd: Command,
        what: &str,
        ready: Option<mpsc::Sender<String>>,
    ) -> Result<Proc, String> {
        cmd.stdin(Stdio::null())
            .stdout(if ready.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                if log.len() == 30 {
                    log.remove(0);
                }
                log.push(line);
            }
        });
        if let (Some(tx), Some(stdout)) = (ready, child.stdout.take()) {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Proc {
            child,
            what: what.to_string(),
            log,
        })
    }

    fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        std::thread::sleep(Duration::from_millis(100)); // let the log drain
        Some(format!(
            "{} exited ({status}):\n{}",
            self.what,
            self.log.lock().unwrap().join("\n")
        ))
    }
}

/// A running variant.
pub struct Server {
    pub variant: Variant,
    pub workers: usize,
    pub addr: SocketAddr,
    procs: Vec<Proc>,
    /// Pid of the front process (see `Variant::front`).
    front: u32,
    dir: Option<PathBuf>,
}

impl Server {
    pub fn start(variant: Variant, workers: usize, programs: &Programs) -> Result<Server, String> {
        let port = crate::host::free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let node_worker = || {
            let mut cmd = Command::new("node");
            cmd.arg(programs.server_js()).arg("worker");
            cmd
        };
        let mut server = Server {
            variant,
            workers,
            addr,
            procs: Vec::new(),
            front: 0,
            dir: None,
        };
        match variant {
            Variant::Sticky
            | Variant::StickyRust
            | Variant::StickySyn
            | Variant::StickyCookie
            | Variant::StickyBpfCookie => {
                let mut cmd = Command::new(&programs.sticky);
                cmd.args(["run", "--listen", &addr.to_string(), "--workers"])
                    .arg(workers.to_string());
                let placement = match variant {
                    Variant::StickySyn => Some("syn"),
                    Variant::StickyCookie => Some("cookie"),
                    Variant::StickyBpfCookie => Some("bpf-cookie"),
                    _ => None,
                };
                if let Some(p) = placement {
                    cmd.args(["--placement", p]);
                }
                cmd.arg("--");
                if variant != Variant::StickyRust {
                    let worker = node_worker();
                    cmd.arg(worker.get_program()).args(worker.get_args());
                } else {
                    cmd.arg(&programs.rust_worker);
                }
                server.procs.push(Proc::spawn(cmd, "sticky run", None)?);
            }
            Variant::SocketIoSticky | Variant::Floor => {
                let mode = match variant {
                    Variant::Floor => "floor",
                    _ => "sticky-master",
                };
                let mut cmd = Command::new("node");
                cmd.arg(programs.server_js())
                    .arg(mode)
                    .arg(workers.to_string())
                    .arg(port.to_string());
                server
                    .procs
                    .push(Proc::spawn(cmd, &format!("node server.js {mode}"), None)?);
            }
            Variant::Nginx => {
                let nginx = programs
                    .nginx
                    .as_ref()
                    .ok_or("nginx is not installed (apt-get install nginx)")?;
                // The workers first: nginx needs their ports.
                let (tx, rx) = mpsc::channel();
                let mut ports = Vec::new();
                for i in 0..workers {
                    server.procs.push(Proc::spawn(
                        node_worker(),
                        &format!("node worker {i}"),
                        Some(tx.clone()),
                    )?);
                }
                let deadline = Instant::now() + STARTUP_TIMEOUT;
                while ports.len() < workers {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                        Ok(line) => {
                            if let Some(p) = line.strip_prefix("ready ") {
                                ports.push(
                                    p.trim()
                                        .parse::<u16>()
                                        .map_err(|_| format!("node worker printed {line:?}"))?,
                                );
                            }
                        }
                        Err(_) if left.is_zero() => {
                            return Err("node workers did not start within 30 s".into())
                        }
                        Err(_) => server.check_alive()?,
                    }
                }
                let dir = std::env::temp_dir()
                    .join(format!("sticky-bench-nginx-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                server.dir = Some(dir.clone());
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&dir, addr, &ports))
                    .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                let mut cmd = Command::new(nginx);
                cmd.arg("-p").arg(&dir).arg("-c").arg(&conf).args([
                    "-e",
                    "stderr",
                    "-g",
                    "daemon off;",
                ]);
                server.procs.push(Proc::spawn(cmd, "nginx", None)?);
            }
        }
        server.front = server
            .procs
            .last()
            .expect("one process at least")
            .child
            .id();
        server.wait_ready()?;
        Ok(server)
    }

    /// Polls a handshake until one succeeds.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let handshake = http::request(
            "GET",
            &format!("{}&transport=polling", crate::eio::PATH),
            b"",
            true,
        );
        loop {
            self.check_alive()?;
            if crate::host::interrupted() {
                return Err("interrupted".into());
            }
            match http::exchange(self.addr, None, &handshake) {
                Ok(r) if r.status == 200 => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "{} with {} workers did not answer a handshake on {} within {STARTUP_TIMEOUT:?}",
                        self.variant.label(),
                        self.workers,
                        self.addr
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Results are meaningless if a process died during the run.
    pub fn check_alive(&mut self) -> Result<(), String> {
        for p in &mut self.procs {
            if let Some(why) = p.exited() {
                return Err(why);
            }
        }
        Ok(())
    }

    /// CPU time (user + system) the front has used so far, in seconds: the
    /// front process, and for nginx its worker processes too.
    pub fn front_cpu(&self) -> f64 {
        let mut pids = vec![self.front];
        if self.variant == Variant::Nginx {
            pids.extend(descendants(self.front));
        }
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        pids.iter().map(|&p| cpu_ticks(p) as f64 / hz).sum()
    }
}

impl Drop for Server {
    /// SIGTERM to every process started (and its process group), SIGKILL
    /// to whatever of them and their descendants is left after 5 s.
    fn drop(&mut self) {
        let mut all: Vec<u32> = Vec::new();
        for p in &self.procs {
            let pid = p.child.id();
            all.push(pid);
            all.extend(descendants(pid));
            // SAFETY: signals to processes this harness started.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.procs {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for pid in all {
            if Path::new(&format!("/proc/{pid}")).exists() {
                // SAFETY: as above; a pid that exited is gone or a zombie
                // of ours (reaped below), so no stranger is signalled.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        for p in &mut self.procs {
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn nginx_conf(dir: &Path, addr: SocketAddr, ports: &[u16]) -> String {
    let d = dir.display();
    let servers: String = ports
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p};\n"))
        .collect();
    // As the Socket.IO documentation suggests (ip_hash, WebSocket headers),
    // with keep-alive upstream connections: HTTP/1.1 and an empty
    // Connection header except on upgrades. Node closes idle connections
    // after 5 s, so nginx lets go of them first.
    format!(
        "worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}
    upstream workers {{
        ip_hash;
{servers}        keepalive 64;
        keepalive_timeout 4s;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}
}}
"
    )
}

/// utime + stime of `pid`, in clock ticks (0 if it is gone).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // pid (comm) state ppid ...: comm may hold spaces; utime and stime are
    // fields 14 and 15, i.e. the 12th and 13th after the comm.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Every live descendant of `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|e| {
            let p = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            Some((p, rest.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// nginx: on PATH or in /usr/sbin; else Debian's package, unpacked (not
/// installed: its maintainer scripts would start a system-wide service)
/// into `cache` with `apt-get download`.
pub fn find_or_fetch_nginx(cache: &Path) -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin")])
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    });
    if let Some(p) = on_path {
        return Ok(p);
    }
    let unpacked = cache.join("usr/sbin/nginx");
    if unpacked.is_file() {
        return Ok(unpacked);
    }
    eprintln!(
        "nginx not found: fetching Debian's package into {}",
        cache.display()
    );
    std::fs::create_dir_all(cache)
        .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .current_dir(cache)
            .output()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let download =
        |cmd: &mut Command| run(cmd.args(["download", "nginx"]), "apt-get download nginx");
    if download(&mut Command::new("apt-get")).is_err() {
        run(Command::new("apt-get").arg("update"), "apt-get update")?;
        download(&mut Command::new("apt-get"))?;
    }
    let deb = std::fs::read_dir(cache)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download nginx left no .deb")?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg("."),
        "dpkg-deb -x",
    )?;
    if !unpacked.is_file() {
        return Err(format!(
            "{} not found in {}",
            unpacked.display(),
            deb.display()
        ));
    }
    // Its libraries (pcre2, ssl, zlib) are the usual base system ones.
    let out = Command::new(&unpacked)
        .arg("-v")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", unpacked.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the unpacked nginx does not run ({}); install it with apt-get install nginx",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(unpacked)
}
