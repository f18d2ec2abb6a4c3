//! The zstd level under `compression = "auto"`, adapted to the link (issue 21, item 3).
//!
//! Packing and sending run side by side (the next episode is packed while the current one is
//! on the wire), so the slower of the two sets the pace. When sending is the slower stage, a
//! higher level costs nothing and makes the body smaller; when packing is, a lower level ships
//! sooner. The controller compares the two in seconds per tar byte: each fresh pack reports its
//! wall time, tar bytes and body bytes; each stored upload reports its time and the body bytes
//! it sent, turned into tar bytes with the compression ratio the packs saw. Once both stages
//! have enough evidence at the current level it moves one step and starts counting afresh.
//!
//! The two stages share the lab host's CPU, so when the shipper keeps its cores busy a pack's
//! and an upload's wall times both stretch and their ratio says little: then the CPU is the
//! bottleneck, and the level goes down whatever the ratio. The daemon passes its own CPU time
//! with every report ([`Usage`]); the share of the cores it may run on ([`BUSY`] or more over
//! the level's evidence) is the test. A step up costs CPU, so it is only taken with headroom
//! (a share under [`CLIMB_BELOW`]); between the two the level stays unless packing is the
//! slower stage, so a level just under the limit does not swing back up.
//!
//! A climb must pay: when the last two steps up together saved less than [`MIN_GAIN`] of the
//! wire bytes, both are undone and the level above stays out of reach for [`BLOCK_TAR_BYTES`]
//! of packed tar (data changes, so the question is asked again later).

/// Send more than this many times slower than pack: one level up (and the reverse: down).
pub const IMBALANCE: f64 = 1.3;
/// Tar bytes packed at the current level before the pack rate counts.
pub const MIN_PACKED: u64 = 8 << 20;
/// Body bytes sent at the current level before the link's rate counts.
pub const MIN_SENT: u64 = 4 << 20;
/// Two climbing steps that save less than this share of the wire bytes are undone.
pub const MIN_GAIN: f64 = 0.02;
/// How much tar is packed before an undone climb's level may be tried again.
pub const BLOCK_TAR_BYTES: u64 = 1 << 30;
/// The lowest level the controller goes to.
pub const MIN_LEVEL: i32 = 1;
/// The process's share of its cores above which the CPU counts as the bottleneck.
pub const BUSY: f64 = 0.85;
/// A step up costs CPU: it is only taken while the share is below this.
pub const CLIMB_BELOW: f64 = 0.6;

/// The process's clock and CPU time at one instant, in seconds from any fixed origin.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Usage {
    pub wall_s: f64,
    pub cpu_s: f64,
}

/// The process's usage when one pack or upload started and when it ended.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Span {
    pub start: Usage,
    pub end: Usage,
}

impl Span {
    fn secs(&self) -> f64 {
        (self.end.wall_s - self.start.wall_s).max(0.0)
    }
}

/// What one level has seen since the controller moved to it.
#[derive(Debug, Default, Clone, Copy)]
struct Evidence {
    pack_s: f64,
    packed_tar: u64,
    packed_body: u64,
    send_s: f64,
    sent_body: u64,
}

impl Evidence {
    fn ratio(&self) -> f64 {
        self.packed_body as f64 / self.packed_tar.max(1) as f64
    }
    fn pack_s_per_tar(&self) -> f64 {
        self.pack_s / self.packed_tar.max(1) as f64
    }
    /// Seconds of link per tar byte: the body's seconds per byte times body bytes per tar byte.
    fn send_s_per_tar(&self) -> f64 {
        self.send_s / self.sent_body.max(1) as f64 * self.ratio()
    }
}

/// A move the controller made, for the log line and the metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub from: i32,
    pub to: i32,
    /// Seconds per GiB of tar, of each stage, as measured at `from`.
    pub pack_s_per_gib: f64,
    pub send_s_per_gib: f64,
    /// The process's share of its cores over the evidence (0-1).
    pub cpu_busy: f64,
    pub why: &'static str,
}

#[derive(Debug)]
pub struct Controller {
    level: i32,
    max: i32,
    now: Evidence,
    /// The compression ratio measured at each level left while climbing (most recent last).
    climb: Vec<(i32, f64)>,
    /// A level undone by the gain rule and the tar bytes still to pack before it may return.
    blocked: Option<(i32, u64)>,
    /// The cores the process may run on.
    cores: f64,
    /// Usage at the start of the earliest pack or upload counted in the current evidence: the
    /// CPU share is taken over everything the evidence covers, not only since the last move.
    since: Option<Usage>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl Controller {
    /// Starts at `start`, moves within `MIN_LEVEL..=max` (`max` is at least `start`), for a
    /// process that may run on `cores` cores.
    pub fn new(start: i32, max: i32, cores: usize) -> Controller {
        let max = max.max(start);
        Controller {
            level: start.clamp(MIN_LEVEL, max),
            max,
            now: Evidence::default(),
            climb: Vec::new(),
            blocked: None,
            cores: cores.max(1) as f64,
            since: None,
        }
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// A fresh pack at `level` made `body` bytes of `tar` bytes over `span`. A pack made at
    /// another level (it started before a move) is not evidence for this one.
    pub fn packed(&mut self, level: i32, tar: u64, body: u64, span: Span) -> Option<Move> {
        if let Some((_, left)) = &mut self.blocked {
            *left = left.saturating_sub(tar);
            if *left == 0 {
                self.blocked = None;
            }
        }
        if level != self.level {
            return None;
        }
        self.now.pack_s += span.secs();
        self.now.packed_tar += tar;
        self.now.packed_body += body;
        self.count(span)
    }

    /// An upload answered 201 sent `body` bytes over `span`; `level` is the one it was packed
    /// at.
    pub fn sent(&mut self, level: i32, body: u64, span: Span) -> Option<Move> {
        if level != self.level {
            return None;
        }
        self.now.send_s += span.secs();
        self.now.sent_body += body;
        self.count(span)
    }

    fn count(&mut self, span: Span) -> Option<Move> {
        let since = self.since.get_or_insert(span.start);
        if span.start.wall_s < since.wall_s {
            *since = span.start;
        }
        self.decide(span.end)
    }

    fn decide(&mut self, at: Usage) -> Option<Move> {
        let e = self.now;
        if e.packed_tar < MIN_PACKED || e.sent_body < MIN_SENT {
            return None;
        }
        let (pack, send) = (e.pack_s_per_tar(), e.send_s_per_tar());
        let since = self.since.unwrap_or(at);
        let wall = at.wall_s - since.wall_s;
        let busy = if wall > 0.0 {
            ((at.cpu_s - since.cpu_s) / (wall * self.cores)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let from = self.level;
        let mv = |to: i32, why: &'static str| Move {
            from,
            to,
            pack_s_per_gib: pack * GIB,
            send_s_per_gib: send * GIB,
            cpu_busy: busy,
            why,
        };
        let up_allowed =
            self.level < self.max && self.blocked.is_none_or(|(level, _)| self.level + 1 < level);
        let decision = if busy >= BUSY {
            self.climb.clear();
            (self.level > MIN_LEVEL).then(|| mv(from - 1, "the CPU is the bottleneck"))
        } else if send > IMBALANCE * pack && up_allowed && busy < CLIMB_BELOW {
            // A climb of two steps that saved too little is undone, the step above blocked.
            match self.climb.as_slice() {
                [.., (l2, r2), (l1, _)] if *l2 == from - 2 && *l1 == from - 1 => {
                    let saved = 1.0 - e.ratio() / r2;
                    if saved < MIN_GAIN {
                        self.blocked = Some((from - 1, BLOCK_TAR_BYTES));
                        self.climb.clear();
                        Some(mv(from - 2, "the last two steps up saved too little"))
                    } else {
                        self.climb.push((from, e.ratio()));
                        Some(mv(from + 1, "sending is the slower stage"))
                    }
                }
                _ => {
                    self.climb.push((from, e.ratio()));
                    Some(mv(from + 1, "sending is the slower stage"))
                }
            }
        } else if pack > IMBALANCE * send && self.level > MIN_LEVEL {
            self.climb.clear();
            Some(mv(from - 1, "packing is the slower stage"))
        } else {
            None
        };
        // Evidence is per level: a move, or a decision to stay, starts counting afresh.
        self.now = Evidence::default();
        self.since = None;
        if let Some(m) = &decision {
            self.level = m.to;
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A modelled host: packing costs `pack_s_per_mib(level)` and compresses to `ratio(level)`;
    /// the link carries `link_mib_s` MiB of body per second. Feeds 1 MiB episodes until the
    /// controller has made `episodes` decisions' worth of evidence; returns the levels visited.
    /// The CPU stays idle (the share test never fires) unless a test says otherwise.
    fn run(
        c: &mut Controller,
        episodes: usize,
        pack_s_per_mib: impl Fn(i32) -> f64,
        ratio: impl Fn(i32) -> f64,
        link_mib_s: f64,
    ) -> Vec<i32> {
        run_busy(c, episodes, pack_s_per_mib, ratio, link_mib_s, 0.0)
    }

    /// As [`run`], with the process using `busy` of its cores all along.
    fn run_busy(
        c: &mut Controller,
        episodes: usize,
        pack_s_per_mib: impl Fn(i32) -> f64,
        ratio: impl Fn(i32) -> f64,
        link_mib_s: f64,
        busy: f64,
    ) -> Vec<i32> {
        const MIB: u64 = 1 << 20;
        let mut levels = vec![c.level()];
        let cores = c.cores;
        // The process's usage at time t: `busy` of its cores all along.
        let at = |t: f64| Usage {
            wall_s: t,
            cpu_s: t * busy * cores,
        };
        let span = |t: f64, secs: f64| Span {
            start: at(t),
            end: at(t + secs),
        };
        let mut t = 0.0;
        for _ in 0..episodes {
            let l = c.level();
            let body = (MIB as f64 * ratio(l)) as u64;
            let (pack, send) = (pack_s_per_mib(l), body as f64 / MIB as f64 / link_mib_s);
            c.packed(l, MIB, body, span(t, pack));
            c.sent(l, body, span(t, send));
            // The stages overlap: an episode takes the slower one's time.
            t += pack.max(send);
            if c.level() != *levels.last().unwrap() {
                levels.push(c.level());
            }
        }
        levels
    }

    /// Each level costs 30 % more CPU than the one below and saves 3 % of the bytes.
    fn cost(l: i32) -> f64 {
        0.01 * 1.3f64.powi(l)
    }
    fn saving(l: i32) -> f64 {
        0.4 * 0.97f64.powi(l)
    }

    #[test]
    fn a_slow_link_raises_the_level_until_the_stages_balance() {
        let mut c = Controller::new(3, 9, 2);
        // Link: 5 MiB/s of body, about 13 MiB/s of tar; pack at level 3: 45 MiB/s of tar.
        let levels = run(&mut c, 2000, cost, saving, 5.0);
        assert_eq!(levels[..3], [3, 4, 5], "{levels:?}");
        let end = c.level();
        // Balance: neither stage 1.3 times slower than the other at the level it settled on.
        let pack = cost(end);
        let send = saving(end) / 5.0;
        assert!(
            send <= IMBALANCE * pack && pack <= IMBALANCE * send,
            "{levels:?}"
        );
    }

    #[test]
    fn a_fast_link_takes_the_level_down_to_the_floor() {
        let mut c = Controller::new(3, 9, 2);
        let levels = run(&mut c, 200, cost, saving, 10_000.0);
        assert_eq!(levels, [3, 2, 1]);
        assert_eq!(c.level(), MIN_LEVEL);
    }

    #[test]
    fn the_level_stays_within_its_bounds() {
        let mut c = Controller::new(3, 5, 2);
        // A link so slow that every level would climb, with a saving big enough to pay.
        let levels = run(&mut c, 500, cost, |l| 0.9f64.powi(l), 0.01);
        assert_eq!(*levels.iter().max().unwrap(), 5, "{levels:?}");
        assert_eq!(c.level(), 5);
        // The ceiling is at least the starting level.
        assert_eq!(Controller::new(12, 9, 2).level(), 12);
        assert_eq!(Controller::new(0, 9, 2).level(), MIN_LEVEL);
    }

    #[test]
    fn a_move_waits_for_enough_of_both_stages() {
        let mut c = Controller::new(3, 9, 2);
        let took = |secs: f64| Span {
            start: Usage::default(),
            end: Usage {
                wall_s: secs,
                cpu_s: 0.0,
            },
        };
        // Far slower link than pack, but just under the evidence thresholds: no move.
        assert_eq!(c.packed(3, MIN_PACKED - 1, MIN_SENT, took(0.01)), None);
        assert_eq!(c.sent(3, MIN_SENT, took(100.0)), None);
        assert_eq!(c.level(), 3);
        // One byte more packed: the decision is made on both stages' figures.
        let m = c.packed(3, 1, 0, took(0.0)).unwrap();
        assert_eq!((m.from, m.to), (3, 4));
        assert!(m.send_s_per_gib > m.pack_s_per_gib * IMBALANCE, "{m:?}");
        // Evidence of the old level (a pack started before the move) does not count.
        assert_eq!(c.packed(3, MIN_PACKED, MIN_SENT, took(0.0)), None);
        assert_eq!(c.sent(3, MIN_SENT, took(100.0)), None);
        assert_eq!(c.level(), 4);
    }

    #[test]
    fn a_climb_that_saves_too_little_is_undone_and_its_ceiling_kept() {
        let mut c = Controller::new(3, 9, 2);
        // Every level saves only 0.5 % more than the one below: not worth two steps.
        let flat = |l: i32| 0.4 * 0.995f64.powi(l);
        let levels = run(&mut c, 120, cost, flat, 1.0);
        assert_eq!(levels[..4], [3, 4, 5, 3], "{levels:?}");
        // Back at 3 with 4 blocked: the link is still slow, yet the level holds until 1 GiB of
        // tar has been packed since the undo, then the climb is tried again.
        let mut c = Controller::new(3, 9, 2);
        let mut undone_at = None;
        let mut again_at = None;
        for episode in 0..3000u64 {
            let l = c.level();
            let body = ((1u64 << 20) as f64 * flat(l)) as u64;
            let took = |secs: f64| Span {
                start: Usage::default(),
                end: Usage {
                    wall_s: secs,
                    cpu_s: 0.0,
                },
            };
            c.packed(l, 1 << 20, body, took(cost(l)));
            c.sent(l, body, took(body as f64 / (1u64 << 20) as f64));
            match (l, c.level()) {
                (5, 3) => undone_at = undone_at.or(Some(episode)),
                (3, 4) if undone_at.is_some() => {
                    again_at = Some(episode);
                    break;
                }
                (_, to) if undone_at.is_some() => assert_eq!(to, 3, "moved while blocked"),
                _ => {}
            }
        }
        let waited_mib = again_at.unwrap() - undone_at.unwrap();
        let block_mib = BLOCK_TAR_BYTES >> 20;
        // The block lifts after 1 GiB; the move then waits for one level's worth of evidence.
        assert!(
            (block_mib..block_mib + 16).contains(&waited_mib),
            "{waited_mib} MiB"
        );
    }

    #[test]
    fn balanced_stages_keep_the_level() {
        let mut c = Controller::new(3, 9, 2);
        // Send 1.2 times slower than pack: inside the dead band.
        let levels = run(&mut c, 300, |_| 0.01, |_| 0.5, 0.5 / 0.012);
        assert_eq!(levels, [3]);
    }

    #[test]
    fn a_busy_cpu_takes_the_level_down_even_when_sending_looks_slower() {
        // Sending looks 3-10 times slower than packing, which alone would climb, but the
        // process keeps 90 % of its cores busy: the CPU sets the pace, so the level goes down.
        let mut c = Controller::new(3, 9, 1);
        let levels = run_busy(&mut c, 200, cost, saving, 5.0, 0.9);
        assert_eq!(levels, [3, 2, 1]);
        // Between the two limits it holds: no headroom for a step up, not busy enough to
        // step down.
        let mut c = Controller::new(3, 9, 1);
        let levels = run_busy(&mut c, 200, cost, saving, 5.0, BUSY - 0.01);
        assert_eq!(levels, [3]);
        // With headroom the same host climbs.
        let mut c = Controller::new(3, 9, 1);
        let levels = run_busy(&mut c, 200, cost, saving, 5.0, CLIMB_BELOW - 0.01);
        assert_eq!(levels[..3], [3, 4, 5], "{levels:?}");
        // The share is of the cores the process may use: 0.9 of one core on two is not busy.
        let mut c = Controller::new(3, 9, 2);
        let levels = run_busy(&mut c, 200, cost, saving, 5.0, 0.45);
        assert_eq!(levels[..3], [3, 4, 5], "{levels:?}");
    }

    #[test]
    fn the_cpu_share_covers_the_whole_evidence_not_only_the_last_moments() {
        // A slow link: one upload of 5 MiB takes 9.6 s; then one 8 MiB pack keeps the core
        // busy for 0.4 s. Over both spans the CPU is nearly idle (5 %), so the controller
        // climbs; measured from the upload's end it would have looked fully busy.
        let mut c = Controller::new(3, 9, 1);
        let at = |wall_s: f64, cpu_s: f64| Usage { wall_s, cpu_s };
        let upload = Span {
            start: at(0.0, 0.0),
            end: at(9.6, 0.1),
        };
        let pack = Span {
            start: at(9.6, 0.1),
            end: at(10.0, 0.5),
        };
        assert_eq!(c.sent(3, 5 << 20, upload), None);
        let m = c.packed(3, MIN_PACKED, 3 << 20, pack).unwrap();
        assert_eq!((m.from, m.to), (3, 4), "{m:?}");
        assert!((m.cpu_busy - 0.05).abs() < 1e-9, "{m:?}");
    }
}
