//! `cis490-receiver scrub` (SPEC §15): every indexed episode (the last row of each id) is
//! checked against the store: the body is there, has the indexed length, decompresses into a
//! valid episode tar, and that tar's SHA-256 is the row's. It only reads, at a bounded rate, so
//! it runs beside a serving receiver; `--repair` moves a truncated or corrupt body to the
//! quarantine so that the next upload of the episode is stored again. This file holds what both
//! stores share (findings, tally, pace, the verdict on a body) and the fs walk; the bucket walk
//! is `s3/scrub.rs`.

use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use cis490_common::durable;

use super::{IndexRow, QuarantineNote};

/// What is wrong with a stored episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Problem {
    /// No body where the row says.
    Missing,
    /// A body of another length than the row's `bytes`.
    Truncated,
    /// The right length, but it does not decompress to a valid episode with the row's SHA-256.
    Corrupt,
}

impl Problem {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Problem::Missing => "missing",
            Problem::Truncated => "truncated",
            Problem::Corrupt => "corrupt",
        }
    }
}

/// One bad episode.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Finding {
    pub host_id: String,
    pub episode_id: String,
    pub problem: Problem,
    /// Why, for a person (not in the JSON of SPEC §15).
    #[serde(skip)]
    pub detail: String,
}

/// The last line of a scrub.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Tally {
    pub checked: u64,
    pub missing: u64,
    pub truncated: u64,
    pub corrupt: u64,
    /// Body bytes read (what the pace bounds); not in the JSON of SPEC §15.
    #[serde(skip)]
    pub bytes_read: u64,
}

impl Tally {
    pub(crate) fn bad(&self) -> u64 {
        self.missing + self.truncated + self.corrupt
    }

    pub(crate) fn count(&mut self, p: Problem) {
        match p {
            Problem::Missing => self.missing += 1,
            Problem::Truncated => self.truncated += 1,
            Problem::Corrupt => self.corrupt += 1,
        }
    }
}

/// One pace for a whole scrub: at most `per_s` body bytes a second on average since `since`
/// (0: no limit). The budget carries over from one episode to the next.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    per_s: u64,
    read: u64,
    since: Instant,
}

impl Pace {
    pub(crate) fn new(per_s: u64) -> Pace {
        Pace {
            per_s,
            read: 0,
            since: Instant::now(),
        }
    }

    /// Body bytes read so far.
    pub(crate) fn read(&self) -> u64 {
        self.read
    }
}

/// A reader that sleeps as needed to keep its [`Pace`].
pub(crate) struct Paced<R> {
    inner: R,
    pace: Pace,
}

impl<R> Paced<R> {
    pub(crate) fn new(inner: R, pace: Pace) -> Paced<R> {
        Paced { inner, pace }
    }

    /// The pace, to carry on with the next body.
    pub(crate) fn pace(&self) -> Pace {
        self.pace
    }
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let p = &mut self.pace;
        p.read += n as u64;
        if p.per_s > 0 {
            let due = Duration::from_secs_f64(p.read as f64 / p.per_s as f64);
            let spent = p.since.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
        Ok(n)
    }
}

/// Reads a whole body through the receiver's validator and compares its tar SHA-256 with the
/// row's: `Ok(None)` when it is the episode, `Ok(Some(corrupt))` when it is not, `Err` when the
/// body could not be read (which says nothing about the body itself).
pub(crate) fn judge<R: Read>(
    body: R,
    row: &IndexRow,
    max_uncompressed: u64,
) -> io::Result<Option<(Problem, String)>> {
    match crate::ingest::summarize_reader(body, &row.episode_id, max_uncompressed) {
        Ok(v) if v.tar_sha256 == row.tar_sha256 => Ok(None),
        Ok(v) => Ok(Some((
            Problem::Corrupt,
            format!(
                "its tar SHA-256 is {}, the index says {}",
                v.tar_sha256, row.tar_sha256
            ),
        ))),
        Err(crate::ingest::Rejection::Source(e)) => Err(e),
        Err(r) => Ok(Some((
            Problem::Corrupt,
            format!("it does not read as the episode: {r}"),
        ))),
    }
}

/// The last row of every id in `index.jsonl`, in the order they stand.
pub(crate) fn last_rows(text: &str) -> Vec<(&str, IndexRow)> {
    let rows: Vec<(&str, IndexRow)> = text
        .lines()
        .filter_map(|l| Some((l, serde_json::from_str::<IndexRow>(l).ok()?)))
        .collect();
    let mut last = std::collections::HashMap::new();
    for (i, (_, r)) in rows.iter().enumerate() {
        last.insert((r.host_id.clone(), r.episode_id.clone()), i);
    }
    rows.into_iter()
        .enumerate()
        .filter(|(i, (_, r))| last.get(&(r.host_id.clone(), r.episode_id.clone())) == Some(i))
        .map(|(_, x)| x)
        .collect()
}

fn check(
    root: &Path,
    row: &IndexRow,
    max_uncompressed: u64,
    pace: &mut Pace,
) -> Option<(Problem, String)> {
    let path = root.join(&row.path);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Some((
                Problem::Missing,
                format!("{} does not exist", path.display()),
            ))
        }
        Err(e) => return Some((Problem::Missing, format!("{}: {e}", path.display()))),
    };
    if meta.len() != row.bytes {
        return Some((
            Problem::Truncated,
            format!(
                "{} has {} bytes, the index says {}",
                path.display(),
                meta.len(),
                row.bytes
            ),
        ));
    }
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return Some((Problem::Corrupt, format!("{}: {e}", path.display()))),
    };
    let mut reader = Paced::new(io::BufReader::new(file), *pace);
    let verdict = judge(&mut reader, row, max_uncompressed);
    *pace = reader.pace();
    // A local disk that cannot read its own file back holds a corrupt body.
    verdict.unwrap_or_else(|e| Some((Problem::Corrupt, format!("{}: {e}", path.display()))))
}

/// Moves a bad body into `quarantine/` with a note naming the problem (`scrub_<problem>`).
fn quarantine(root: &Path, row: &IndexRow, f: &Finding) -> io::Result<()> {
    let qdir = root.join("quarantine");
    durable::create_dir_durable(&qdir)?;
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let base = format!(
        "{stamp}-{}-{}-{}",
        row.host_id,
        row.episode_id,
        rand::random::<u32>()
    );
    let note = QuarantineNote::new(
        row.host_id.clone(),
        row.episode_id.clone(),
        row.commit.clone(),
        0,
        &format!("scrub_{}", f.problem.as_str()),
        f.detail.clone(),
    );
    let json = serde_json::to_vec_pretty(&note).map_err(io::Error::other)?;
    durable::write_atomic(&qdir.join(format!("{base}.reason.json")), &json)?;
    durable::rename_durable(&root.join(&row.path), &qdir.join(format!("{base}.tar.zst")))
}

/// Scrubs the fs store at `root`; `report` sees each bad episode as it is found. `stopped` is
/// asked before each episode: a stopping receiver does not wait for a whole scrub.
pub(crate) fn scrub_fs(
    root: &Path,
    max_uncompressed: u64,
    per_s: u64,
    repair: bool,
    stopped: &dyn Fn() -> bool,
    mut report: impl FnMut(&Finding),
) -> anyhow::Result<Tally> {
    let index = root.join("index.jsonl");
    let text = match fs::read_to_string(&index) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("failed to read {}: {e}", index.display()),
    };
    let mut tally = Tally::default();
    let mut pace = Pace::new(per_s);
    for (_, row) in last_rows(&text) {
        if stopped() {
            break;
        }
        tally.checked += 1;
        let verdict = check(root, &row, max_uncompressed, &mut pace);
        tally.bytes_read = pace.read();
        let Some((problem, detail)) = verdict else {
            continue;
        };
        tally.count(problem);
        let f = Finding {
            host_id: row.host_id.clone(),
            episode_id: row.episode_id.clone(),
            problem,
            detail,
        };
        if repair && problem != Problem::Missing {
            quarantine(root, &row, &f).map_err(|e| {
                anyhow::anyhow!("failed to move {} to the quarantine: {e}", row.path)
            })?;
        }
        report(&f);
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_bounds_the_read_rate() {
        let data = vec![7u8; 1 << 20];
        let started = Instant::now();
        let mut r = Paced::new(&data[..], Pace::new(4 << 20));
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).unwrap();
        assert_eq!(sink.len(), 1 << 20);
        assert!(
            started.elapsed() >= Duration::from_millis(240),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_last_row_of_an_id_wins() {
        let row = |ep: &str, ts: &str| {
            format!(
                r#"{{"ts":"{ts}","host_id":"h","episode_id":"{ep}","path":"p","bytes":1,"tar_sha256":"s","uncompressed_bytes":1,"files":1,"commit":"c"}}"#
            )
        };
        let text = [row("a", "1"), row("b", "2"), "torn{".into(), row("a", "3")].join("\n");
        let got: Vec<(String, String)> = last_rows(&text)
            .into_iter()
            .map(|(_, r)| (r.episode_id, r.ts))
            .collect();
        assert_eq!(got, [("b".into(), "2".into()), ("a".into(), "3".into())]);
    }
}
