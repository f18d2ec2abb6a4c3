//! Issue 21, item 3: the time to ship about 1 GB over a link of 100 Mbit/s, 1 Gbit/s and
//! loopback's own speed, with `compression = "auto"` (the level follows the link) against
//! `compression = "level"` at zstd 3. The link is a paced relay on loopback
//! ([`cis490_tests::relay::Relay::paced`]) shared by the shipper's two uploads; the shipper
//! runs on core 0, the receiver and the relay on core 1 (`taskset`), so the receiver's CPU
//! does not make the link look slower than it is.

use std::process::Stdio;
use std::time::Instant;

use cis490_tests::harness::{bin, World};
use cis490_tests::relay::Relay;

use crate::compare::{self, Workload};

struct Run {
    wall: f64,
    shipper_cpu: f64,
    wire: u64,
    /// The levels the shipper moved through (`event=zstd_level`), starting at 3.
    levels: Vec<i32>,
}

async fn ship(w: &World, wl: &Workload, mbps: Option<f64>, mode: &str, round: usize) -> Run {
    let (p, store) = compare::start_receiver(w, round);
    // Unlimited still goes through the relay, so every run pays the same copies.
    let relay = Relay::paced(p.addr, mbps.map_or(f64::INFINITY, |m| m * 1e6)).await;
    let (data, scfg) = compare::stage_shipper(
        w,
        wl,
        round,
        &format!("https://localhost:{}", relay.addr.port()),
        &format!(
            "compression = \"{mode}\"\nzstd_level = 3\nconcurrency = 2\nzstd_threads = 0\nsettle_s = 0\n"
        ),
    );
    let log = w.path().join(format!("shipper-{round}.log"));
    let (cpu0, _) = compare::children_usage();
    let t = Instant::now();
    let out = compare::client_command(&bin("e2e-shipper"))
        .arg("--config")
        .arg(&scfg)
        .arg("once")
        .env("CIS490_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert!(out.success(), "shipper once failed: {}", log.display());
    let (cpu1, _) = compare::children_usage();
    assert_eq!(
        std::fs::read_dir(data.join("shipped")).unwrap().count(),
        wl.episodes
    );
    let mut levels = vec![3];
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        if line.contains("event=\"zstd_level\"") {
            if let Some(to) = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("to="))
                .and_then(|v| v.parse().ok())
            {
                levels.push(to);
            }
        }
    }
    // The shipper's log of each run stays for a look at why the level moved.
    let keep = std::path::Path::new("target/link-logs");
    std::fs::create_dir_all(keep).unwrap();
    std::fs::copy(
        &log,
        keep.join(format!("{}-{}-{mode}.log", wl.name, mbps.unwrap_or(0.0))),
    )
    .unwrap();
    let wire = relay.sent();
    drop(p);
    compare::discard(w, &store);
    compare::discard(w, &data);
    Run {
        wall,
        shipper_cpu: cpu1 - cpu0,
        wire,
        levels,
    }
}

pub async fn run(reps: usize, scale: usize) {
    assert!(
        compare::pinned(),
        "the link bench pins both sides: run it with CIS490_COMPARE_PIN=1 (scripts/bench.sh link does)"
    );
    // The bench process runs the relay: it goes on the receiver's core.
    compare::pin_server(std::process::id());
    let w = World::new(3);
    let n = 40 / scale.min(10);
    let workloads = [
        compare::make_workload(w.path(), "large", n, 10 << 20, 15 << 20, &w.commits[2]),
        compare::make_workload(w.path(), "csv", n, 25 << 20, 0, &w.commits[2]),
    ];
    println!(
        "link: {reps} run(s) per cell; time to ship, level 3 / auto (above 1: auto is faster)"
    );
    let mut round = 0;
    for wl in &workloads {
        let gb = wl.bytes as f64 / 1e9;
        for (label, mbps) in [
            ("100 Mbit/s", Some(100.0)),
            ("1 Gbit/s", Some(1000.0)),
            ("unlimited", None),
        ] {
            let mut cells = Vec::new();
            for mode in ["level", "auto"] {
                let mut runs = Vec::new();
                for _ in 0..reps {
                    runs.push(ship(&w, wl, mbps, mode, round).await);
                    round += 1;
                }
                runs.sort_by(|a, b| a.wall.total_cmp(&b.wall));
                let m = runs.swap_remove(runs.len() / 2);
                println!(
                    "link {:5} {:10} {:5}: {:6.2} s for {gb:.3} GB, shipper CPU {:5.2} s/GB, wire {:.1} MB ({:.1} % of the tar), levels {:?}",
                    wl.name,
                    label,
                    mode,
                    m.wall,
                    m.shipper_cpu / gb,
                    m.wire as f64 / 1e6,
                    m.wire as f64 * 100.0 / wl.bytes as f64,
                    m.levels
                );
                cells.push(m.wall);
            }
            println!(
                "link {:5} {:10} level 3 / auto = {:.2}x",
                wl.name,
                label,
                cells[0] / cells[1]
            );
        }
    }
    compare::empty_trash(&w);
}
