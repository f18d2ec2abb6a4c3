//! cis490 against the pipeline a lab admin would otherwise script:
//! `tar -cf - ID | zstd -3 -T0 | curl --cert ... -T - https://nginx/...` into nginx with
//! `dav_methods PUT` and `ssl_verify_client on`. Same data, same certificates, same machine, one
//! run, alternating sides; state reset between runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cis490_tests::episode;
use cis490_tests::harness::{bin, Process, World};

const HOST: &str = "labhost-01";

/// `CIS490_COMPARE_PIN=1`: the client side (the shipper, or the tar|zstd|curl pipeline) runs on
/// core 0 and the server side (the receiver, or nginx and its workers) on core 1, so each
/// side's CPU cost shows alone and a shared 2-core machine's noise matters less.
pub(crate) fn pinned() -> bool {
    std::env::var("CIS490_COMPARE_PIN").is_ok_and(|v| v == "1")
}

/// Moves every thread of `pid` (and the threads it makes later) to `core`.
pub(crate) fn pin_server(pid: u32) {
    if pinned() {
        let st = Command::new("taskset")
            .args(["-a", "-cp", "1", &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("taskset runs (util-linux)");
        assert!(st.success(), "taskset -a -cp 1 {pid}");
    }
}

/// The command that starts the client side: under `taskset -c 0` when pinned.
pub(crate) fn client_command(program: &Path) -> Command {
    if pinned() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// user+sys seconds of one process (all its threads), from /proc.
pub(crate) fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|a| a.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

pub(crate) fn hwm_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:").map(|v| {
                v.trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// CPU seconds and max RSS of waited-for children so far (rusage).
pub(crate) fn children_usage() -> (f64, f64) {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (
        secs(u.user_time()) + secs(u.system_time()),
        u.max_rss() as f64 / 1024.0,
    )
}

/// Seeded bytes: compressible sensor-log text (kind 0) or incompressible frames.
pub(crate) fn gen(kind: u8, size: usize, seed: u64) -> Vec<u8> {
    if kind == 0 {
        episode::csv(size, seed)
    } else {
        episode::random(size, seed)
    }
}

pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) dir: PathBuf,
    pub(crate) episodes: usize,
    pub(crate) bytes: u64,
}

pub(crate) fn make_workload(
    root: &Path,
    name: &'static str,
    n: usize,
    log_bytes: usize,
    frame_bytes: usize,
    commit: &str,
) -> Workload {
    let dir = root.join(format!("workload-{name}"));
    let mut bytes = 0;
    for i in 0..n {
        let d = dir.join(format!("{name}-{i:05}"));
        std::fs::create_dir_all(d.join("camera")).unwrap();
        let meta = format!("{{\"episode_id\": \"{name}-{i:05}\", \"code_version\": {{\"commit\": \"{commit}\"}}}}\n");
        std::fs::write(d.join("meta.json"), &meta).unwrap();
        let log = gen(0, log_bytes, i as u64 * 2 + 1);
        let frames = gen(1, frame_bytes, i as u64 * 2 + 2);
        std::fs::write(d.join("joints.csv"), &log).unwrap();
        std::fs::write(d.join("camera/frames.bin"), &frames).unwrap();
        bytes += (meta.len() + log.len() + frames.len()) as u64;
    }
    Workload {
        name,
        dir,
        episodes: n,
        bytes,
    }
}

struct Sample {
    wall: f64,
    client_cpu: f64,
    server_cpu: f64,
    client_rss: f64,
    server_rss: f64,
}

fn nginx_conf(w: &World, dir: &Path, port: u16) -> PathBuf {
    let conf = dir.join("nginx.conf");
    std::fs::create_dir_all(dir.join("www/upload")).unwrap();
    std::fs::write(
        &conf,
        format!(
            r#"{user}worker_processes 2;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        client_max_body_size 0;
        location /upload/ {{
            root {d}/www;
            dav_methods PUT;
            create_full_put_path on;
        }}
    }}
}}
"#,
            // As root, workers would drop to `nobody` and could not write the test's dirs.
            user = if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
                == 0
            {
                "user root root;\n"
            } else {
                ""
            },
            d = dir.display(),
            cert = w.server.cert.display(),
            key = w.server.key.display(),
            ca = w.pki.ca_file.display(),
        ),
    )
    .unwrap();
    conf
}

/// nginx for one run; stopped (SIGQUIT, graceful) when dropped, also when the run panics.
struct Nginx(Child);

impl Nginx {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = self.0.wait();
    }
}

fn start_nginx(conf: &Path, dir: &Path) -> Nginx {
    let child = Command::new("nginx")
        .args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx runs (scripts/bench.sh compare installs it)");
    std::thread::sleep(Duration::from_millis(300));
    Nginx(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resets state between runs without deleting: the run's directory moves into `trash/`, emptied
/// after the last run ([`empty_trash`]). On ext4 without a journal (this machine's root), a new
/// file's inode is found by stepping over every free inode of its group deleted in the last
/// 60 s (360 s while the inode table block is still dirty), so cleaning up thousands of files
/// charged a third of the next run's receiver CPU to whichever side ran after the cleanup.
/// Before every run, each side's: writes back dirty pages and drops the page, dentry and inode
/// caches (`sync; echo 3 > /proc/sys/vm/drop_caches`, as root), so no run inherits the caches
/// the runs before it grew. Without it a sitting slowed run by run: the receiver's CPU for the
/// same 5,000 small episodes rose from 2.5 s to 6 s over a dozen runs, and one drop brought it
/// back (BENCHMARKS.md, issue 21). `CIS490_COMPARE_DROP_CACHES=0` keeps the caches.
pub(crate) fn reset_caches() {
    if std::env::var("CIS490_COMPARE_DROP_CACHES").is_ok_and(|v| v == "0") {
        return;
    }
    nix::unistd::sync();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| eprintln!("compare: caches not dropped between runs: {e}"));
    }
    std::thread::sleep(Duration::from_millis(500));
}

pub(crate) fn discard(w: &World, path: &Path) {
    if !path.exists() {
        return;
    }
    let trash = w.path().join("trash");
    std::fs::create_dir_all(&trash).unwrap();
    let n = std::fs::read_dir(&trash).unwrap().count();
    std::fs::rename(path, trash.join(n.to_string())).unwrap();
}

pub(crate) fn empty_trash(w: &World) {
    let _ = std::fs::remove_dir_all(w.path().join("trash"));
}

fn run_peer(w: &World, wl: &Workload, parallel: usize) -> Sample {
    reset_caches();
    let dir = w.path().join("nginx");
    discard(w, &dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let conf = nginx_conf(w, &dir, port);
    let nginx = start_nginx(&conf, &dir);
    let workers = children_of(nginx.id());
    pin_server(nginx.id());
    for p in &workers {
        pin_server(*p);
    }
    let me = w.pki.client(HOST);
    let one = format!(
        "tar -C '{wd}' -cf - \"$1\" | zstd -3 -T0 -q -c | curl -sS --fail --cacert '{ca}' --cert '{cert}' --key '{key}' -T - -o /dev/null https://localhost:{port}/upload/\"$1\".tar.zst",
        wd = wl.dir.display(),
        ca = w.pki.ca_file.display(),
        cert = me.cert.display(),
        key = me.key.display(),
    );
    let script = format!(
        "ls '{}' | xargs -P {parallel} -I{{}} sh -c '{}' _ {{}}",
        wl.dir.display(),
        one.replace('\'', "'\\''")
    );
    // A fresh python3 parent reports its descendants' CPU and peak RSS (getrusage), so earlier
    // children of this process do not count.
    let t = Instant::now();
    let out = client_command(Path::new("python3"))
        .args([
            "-c",
            "import resource,subprocess,sys\nr=subprocess.run(['sh','-c',sys.argv[1]])\nu=resource.getrusage(resource.RUSAGE_CHILDREN)\nprint(r.returncode,u.ru_utime+u.ru_stime,u.ru_maxrss)",
            &script,
        ])
        .output()
        .unwrap();
    let wall = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert!(
        f.len() == 3 && f[0] == 0.0,
        "peer pipeline failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (cpu0, cpu1, rss) = (0.0, f[1], f[2] / 1024.0);
    let server_cpu = cpu_of(nginx.id()) + workers.iter().map(|p| cpu_of(*p)).sum::<f64>();
    let server_rss = workers
        .iter()
        .map(|p| hwm_mib(*p))
        .fold(hwm_mib(nginx.id()), f64::max);
    let stored = std::fs::read_dir(dir.join("www/upload")).unwrap().count();
    assert_eq!(stored, wl.episodes, "nginx stored every upload");
    drop(nginx);
    Sample {
        wall,
        client_cpu: cpu1 - cpu0,
        server_cpu,
        client_rss: rss,
        server_rss,
    }
}

/// A receiver (pinned when asked) on a store of its own for run `round`; (process, store dir).
pub(crate) fn start_receiver(w: &World, round: usize) -> (Process, PathBuf) {
    let store = w.path().join(format!("store-{round}"));
    let cfg = w.config(&format!(
        "[version_gate]\nrepo_path = \"{}\"\n",
        w.repo.path.display()
    ));
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &w.store_dir().display().to_string(),
        &store.display().to_string(),
    );
    std::fs::write(&cfg, text).unwrap();
    let p = Process::start(&cfg, &[]);
    pin_server(p.child.id());
    (p, store)
}

/// A lab host's data dir for run `round` holding the workload (hard links: the shipper moves
/// directories, never rewrites files), and its config sending to `url` with the `[shipping]`
/// lines `shipping`; (data dir, config).
pub(crate) fn stage_shipper(
    w: &World,
    wl: &Workload,
    round: usize,
    url: &str,
    shipping: &str,
) -> (PathBuf, PathBuf) {
    let data = w.path().join(format!("lab-{round}"));
    discard(w, &data);
    std::fs::create_dir_all(data.join("episodes")).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cp -al '{}'/. '{}/episodes/'",
            wl.dir.display(),
            data.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let scfg = w.shipper_config(HOST, url, &format!("[shipping]\n{shipping}"));
    let text = std::fs::read_to_string(&scfg).unwrap().replace(
        &w.data_dir(HOST).display().to_string(),
        &data.display().to_string(),
    );
    std::fs::write(&scfg, text).unwrap();
    (data, scfg)
}

fn run_cis490(w: &World, wl: &Workload, round: usize) -> Sample {
    reset_caches();
    let (p, store) = start_receiver(w, round);
    let (data, scfg) = stage_shipper(
        w,
        wl,
        round,
        &format!("https://localhost:{}", p.addr.port()),
        &format!(
            "concurrency = {}\nzstd_threads = 0\nsettle_s = 0\n",
            std::env::var("CIS490_COMPARE_CONCURRENCY").unwrap_or_else(|_| "2".into())
        ),
    );
    let cpu_r0 = cpu_of(p.child.id());
    let (cpu0, _) = children_usage();
    let t = Instant::now();
    let mut child = client_command(&bin("e2e-shipper"))
        .arg("--config")
        .arg(&scfg)
        .arg("once")
        .env("CIS490_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0.0f64;
    let code = loop {
        peak = peak.max(hwm_mib(child.id()));
        if let Some(st) = child.try_wait().unwrap() {
            break st.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(code, 0, "shipper once failed");
    let (cpu1, _) = children_usage();
    let server_cpu = cpu_of(p.child.id()) - cpu_r0;
    let server_rss = hwm_mib(p.child.id());
    assert_eq!(
        std::fs::read_dir(data.join("shipped")).unwrap().count(),
        wl.episodes
    );
    drop(p);
    discard(w, &store);
    discard(w, &data);
    Sample {
        wall,
        client_cpu: cpu1 - cpu0,
        server_cpu,
        client_rss: peak,
        server_rss,
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn report(wl: &Workload, side: &str, samples: &[Sample]) -> (f64, f64, f64) {
    let walls: Vec<f64> = samples.iter().map(|s| s.wall).collect();
    let (w, wmin, wmax) = stats(&walls);
    let cpu: Vec<f64> = samples
        .iter()
        .map(|s| s.client_cpu + s.server_cpu)
        .collect();
    let (c, cmin, cmax) = stats(&cpu);
    let crss = samples.iter().map(|s| s.client_rss).fold(0.0, f64::max);
    let srss = samples.iter().map(|s| s.server_rss).fold(0.0, f64::max);
    let mbps = wl.bytes as f64 / 1e6 / w;
    let eps = wl.episodes as f64 / w;
    let client: f64 = samples.iter().map(|s| s.client_cpu).sum::<f64>() / samples.len() as f64;
    let server: f64 = samples.iter().map(|s| s.server_cpu).sum::<f64>() / samples.len() as f64;
    let side = if pinned() {
        format!("{side} pinned")
    } else {
        side.to_string()
    };
    println!(
        "compare.{} side={side} runs={} wall_s={w:.2} ({wmin:.2}-{wmax:.2}) input_MBps={mbps:.0} episodes_per_s={eps:.0} cpu_s={c:.2} ({cmin:.2}-{cmax:.2}; client {client:.2}, server {server:.2}) cpu_s_per_GB={:.2} client_peak_rss_MiB={crss:.1} server_peak_rss_MiB={srss:.1}",
        wl.name,
        samples.len(),
        c / (wl.bytes as f64 / 1e9)
    );
    (w, c, eps)
}

fn machine_limits(w: &World) {
    let sample = w.path().join("limits.bin");
    let mut data = gen(0, 100 << 20, 7);
    data.extend(gen(1, 100 << 20, 8));
    std::fs::write(&sample, &data).unwrap();
    let mb = data.len() as f64 / 1e6;
    let time = |cmd: &str| {
        let t = Instant::now();
        let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
        assert!(st.success(), "{cmd}");
        t.elapsed().as_secs_f64()
    };
    let s = sample.display();
    let z1 = time(&format!("zstd -3 -T1 -q -c '{s}' >/dev/null"));
    let z2 = time(&format!("zstd -3 -T2 -q -c '{s}' >/dev/null"));
    let sha = time(&format!("sha256sum '{s}' >/dev/null"));
    let fs = time(&format!(
        "dd if='{s}' of='{}' bs=1M conv=fsync status=none",
        w.path().join("fsync.bin").display()
    ));
    let dir = w.path().join("nginx-limits");
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let conf = nginx_conf(w, &dir, port);
    let nginx = start_nginx(&conf, &dir);
    let me = w.pki.client(HOST);
    let curl = time(&format!(
        "curl -sS --fail --cacert '{}' --cert '{}' --key '{}' -T '{s}' -o /dev/null https://localhost:{port}/upload/x",
        w.pki.ca_file.display(),
        me.cert.display(),
        me.key.display()
    ));
    drop(nginx);
    println!(
        "limits zstd3_T1_MBps={:.0} zstd3_T2_MBps={:.0} sha256_MBps={:.0} fsync_write_MBps={:.0} curl_put_tls_MBps={:.0}",
        mb / z1,
        mb / z2,
        mb / sha,
        mb / fs,
        mb / curl
    );
}

pub fn run(reps: usize, scale: usize) {
    let w = World::new(3);
    if std::env::var("CIS490_COMPARE_PEERS").map_or(true, |v| v != "0") {
        machine_limits(&w);
    }
    let only = std::env::var("CIS490_COMPARE_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only == name;
    let mut workloads = Vec::new();
    if wanted("large") {
        workloads.push(make_workload(
            w.path(),
            "large",
            40 / scale.min(10),
            10 << 20,
            15 << 20,
            &w.commits[2],
        ));
    }
    if wanted("small") {
        workloads.push(make_workload(
            w.path(),
            "small",
            5000 / scale,
            8 << 10,
            8 << 10,
            &w.commits[2],
        ));
    }
    // For profiling cis490 alone: `CIS490_COMPARE_PEERS=0` skips the peer runs and the ratios.
    let peers = std::env::var("CIS490_COMPARE_PEERS").map_or(true, |v| v != "0");
    for wl in &workloads {
        let (mut a, mut b1, mut b2) = (Vec::new(), Vec::new(), Vec::new());
        if !peers {
            let a: Vec<Sample> = (0..reps).map(|r| run_cis490(&w, wl, r)).collect();
            report(wl, "cis490", &a);
            continue;
        }
        for round in 0..reps {
            // Alternate which side goes first so neither always gets the warm cache.
            if round % 2 == 0 {
                a.push(run_cis490(&w, wl, round));
                b1.push(run_peer(&w, wl, 1));
                b2.push(run_peer(&w, wl, 2));
            } else {
                b2.push(run_peer(&w, wl, 2));
                b1.push(run_peer(&w, wl, 1));
                a.push(run_cis490(&w, wl, round));
            }
        }
        let (wa, ca, ea) = report(wl, "cis490", &a);
        let (w1, c1, e1) = report(wl, "tar|zstd|curl>nginx sequential", &b1);
        let (w2, c2, e2) = report(wl, "tar|zstd|curl>nginx 2-way", &b2);
        let (best_w, best_c, best_e) = if w1 < w2 { (w1, c1, e1) } else { (w2, c2, e2) };
        println!(
            "compare.{}{} ratio cis490/best_peer throughput={:.2}x cpu={:.2}x episodes_per_s={:.2}x",
            wl.name,
            if pinned() { " pinned" } else { "" },
            best_w / wa,
            ca / best_c,
            ea / best_e
        );
    }
    if !std::env::var("CIS490_COMPARE_KEEP").is_ok_and(|v| v == "1") {
        empty_trash(&w);
    }
    // For back-to-back profiling runs: `CIS490_COMPARE_KEEP=1` leaves the world on disk, since
    // deleting it would slow the next run's file creation (see `discard`).
    if std::env::var("CIS490_COMPARE_KEEP").is_ok_and(|v| v == "1") {
        eprintln!("kept {}", w.path().display());
        std::mem::forget(w);
    }
}
