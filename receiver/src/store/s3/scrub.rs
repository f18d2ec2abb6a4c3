//! The scrub of SPEC §15 on the bucket: each id with an index object or a body is judged as
//! admission would see it (the row `find` gives, against the body listed for it), its body
//! read back through the validator at the scrub's pace; `--repair` copies a truncated or corrupt
//! body into `quarantine/` and deletes it from `episodes/`.

use std::collections::BTreeSet;
use std::io;

use object_store::path::Path as Key;
use object_store::ObjectStore;

use super::{Body, QuarantineBody, S3Store};
use crate::store::scrub::{judge, Finding, Pace, Paced, Problem, Tally};
use crate::store::{IndexRow, QuarantineNote, StoreUnavailable};

/// An id's episode as the scrub judges it: the row admission would answer from, and the body
/// that row stands for (`None`: no body is stored for the id any more).
struct Judged<'a> {
    row: IndexRow,
    body: Option<&'a Body>,
}

/// The row and body of an id, from its listed bodies (in episode order) and its index object:
/// the index object when it names the episode's body (or when no body is left), else a row
/// taken from the body's listing, as `find` would rebuild it (nothing is written here).
fn judged<'a>(
    host: &str,
    ep: &str,
    bodies: &'a [Body],
    indexed: Option<IndexRow>,
) -> Option<Judged<'a>> {
    match (bodies.first(), indexed) {
        (None, None) => None,
        (None, Some(row)) => Some(Judged { row, body: None }),
        (Some(b), Some(row)) if row.tar_sha256 == b.sha => Some(Judged { row, body: Some(b) }),
        (Some(b), indexed) => Some(Judged {
            row: IndexRow {
                ts: cis490_common::timefmt::rfc3339(b.last_modified),
                host_id: host.to_string(),
                episode_id: ep.to_string(),
                path: b.key.clone(),
                bytes: b.bytes,
                tar_sha256: b.sha.clone(),
                uncompressed_bytes: 0,
                files: 0,
                // Only the quarantine note reads it; the body's own commit is inside it.
                commit: indexed.map(|r| r.commit).unwrap_or_default(),
            },
            body: Some(b),
        }),
    }
}

/// ETags as listings and HEADs give them, without the quotes some stores add to one only.
fn same_version(a: Option<&str>, b: Option<&str>) -> bool {
    let bare = |t: Option<&str>| t.map(|t| t.trim_matches('"').to_string());
    bare(a) == bare(b)
}

impl S3Store {
    /// Scrubs every indexed episode of the bucket; `report` sees each bad episode as it is
    /// found. `stopped` is asked before each episode. A store request that fails ends the
    /// scrub with an error: an unreadable bucket says nothing about the bodies in it.
    pub(crate) async fn scrub(
        &self,
        per_s: u64,
        repair: bool,
        stopped: &(dyn Fn() -> bool + Sync),
        mut report: impl FnMut(&Finding) + Send,
    ) -> anyhow::Result<Tally> {
        let groups = self.all_bodies().await?;
        let mut ids: BTreeSet<(String, String)> = groups.keys().cloned().collect();
        ids.extend(self.indexed_ids().await?);
        let mut tally = Tally::default();
        let mut pace = Pace::new(per_s);
        for (host, ep) in ids {
            if stopped() {
                break;
            }
            let bodies = groups
                .get(&(host.clone(), ep.clone()))
                .map_or(&[][..], Vec::as_slice);
            let indexed = self.read_row(&host, &ep).await?;
            // Listed as an index object a moment ago, and now gone too: nothing to judge.
            let Some(j) = judged(&host, &ep, bodies, indexed) else {
                continue;
            };
            tally.checked += 1;
            let verdict = self.check(&j, &mut pace).await?;
            tally.bytes_read = pace.read();
            let Some((problem, detail)) = verdict else {
                continue;
            };
            tally.count(problem);
            let f = Finding {
                host_id: host.clone(),
                episode_id: ep.clone(),
                problem,
                detail,
            };
            if let (true, Some(body)) = (repair && problem != Problem::Missing, j.body) {
                self.quarantine_scrubbed(&j.row, body, &f)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("failed to move {} to the quarantine: {e}", body.key)
                    })?;
            }
            report(&f);
        }
        Ok(tally)
    }

    /// The (host, id) of every index object.
    async fn indexed_ids(&self) -> Result<Vec<(String, String)>, StoreUnavailable> {
        let strip = format!("{}index/", self.inner.prefix);
        let metas = self.list("list", "index").await?;
        Ok(metas
            .iter()
            .filter_map(|m| {
                let key = m.location.as_ref();
                let rest = key.strip_prefix(&strip)?.strip_suffix(".json")?;
                let (host, ep) = rest.split_once('/')?;
                (!ep.contains('/')).then(|| (host.to_string(), ep.to_string()))
            })
            .collect())
    }

    /// The verdict on one episode: `Ok(None)` when intact.
    async fn check(
        &self,
        j: &Judged<'_>,
        pace: &mut Pace,
    ) -> Result<Option<(Problem, String)>, StoreUnavailable> {
        let row = &j.row;
        let Some(b) = j.body else {
            return Ok(Some((
                Problem::Missing,
                format!("{} does not exist", row.path),
            )));
        };
        // The listing gives the length; a body of any other length (shorter or longer) is
        // "truncated", as on the fs store, and is not read.
        if b.bytes != row.bytes {
            return Ok(Some((
                Problem::Truncated,
                format!(
                    "{} has {} bytes, the index says {}",
                    b.key, b.bytes, row.bytes
                ),
            )));
        }
        let key = Key::parse(&b.key).map_err(|e| StoreUnavailable(e.to_string()))?;
        let Some(reader) = self.open_body(&key).await? else {
            return Ok(Some((
                Problem::Missing,
                format!("{} does not exist", b.key),
            )));
        };
        let (row2, max, p) = (row.clone(), self.inner.max_uncompressed, *pace);
        let (verdict, p) = tokio::task::spawn_blocking(move || {
            let mut r = Paced::new(io::BufReader::new(reader), p);
            let v = judge(&mut r, &row2, max);
            (v, r.pace())
        })
        .await
        .map_err(|e| StoreUnavailable(format!("scrub reader: {e}")))?;
        *pace = p;
        verdict.map_err(|e| StoreUnavailable(format!("failed to read {}: {e}", b.key)))
    }

    /// `--repair`: keeps a bad body in the receiver quarantine (copied, with its reason
    /// `scrub_<problem>`), then deletes it from `episodes/`, so the next upload of the episode
    /// is stored again. A body replaced since it was listed (its episode stored again
    /// meanwhile) is left alone: looked at before the copy, and again just before the delete,
    /// as S3 has no conditional delete.
    async fn quarantine_scrubbed(
        &self,
        row: &IndexRow,
        body: &Body,
        f: &Finding,
    ) -> Result<(), StoreUnavailable> {
        let key = Key::parse(&body.key).map_err(|e| StoreUnavailable(e.to_string()))?;
        if !self.unchanged(&key, body).await? {
            return Ok(());
        }
        let note = QuarantineNote::new(
            row.host_id.clone(),
            row.episode_id.clone(),
            row.commit.clone(),
            0,
            &format!("scrub_{}", f.problem.as_str()),
            f.detail.clone(),
        );
        self.keep_in_quarantine(&note, QuarantineBody::Copy(key.clone(), body.bytes))
            .await?;
        if !self.unchanged(&key, body).await? {
            return Ok(());
        }
        self.delete(&key).await?;
        tracing::warn!(
            event = "quarantined",
            host_id = %row.host_id,
            episode = %row.episode_id,
            reason = %note.error,
            key = %body.key,
            "moved a bad stored body to the receiver quarantine"
        );
        Ok(())
    }

    /// Whether the object at `key` is still the body the scrub judged (same size and ETag).
    async fn unchanged(&self, key: &Key, body: &Body) -> Result<bool, StoreUnavailable> {
        let os = self.inner.os.clone();
        let k = key.clone();
        let now = match self.timed("head", async move { os.head(&k).await }).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(super::unavailable("head", e)),
        };
        let same =
            now.size == body.bytes && same_version(now.e_tag.as_deref(), body.e_tag.as_deref());
        if !same {
            tracing::warn!(
                key = %body.key,
                "a bad body was replaced while the scrub ran; left in place"
            );
        }
        Ok(same)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn body(sha: &str, bytes: u64) -> Body {
        Body {
            key: format!("episodes/h/e/{sha}.tar.zst"),
            sha: sha.to_string(),
            bytes,
            last_modified: SystemTime::UNIX_EPOCH,
            e_tag: None,
        }
    }

    fn row(sha: &str, bytes: u64) -> IndexRow {
        IndexRow {
            ts: "t".into(),
            host_id: "h".into(),
            episode_id: "e".into(),
            path: format!("episodes/h/e/{sha}.tar.zst"),
            bytes,
            tar_sha256: sha.into(),
            uncompressed_bytes: 1,
            files: 1,
            commit: "c".into(),
        }
    }

    #[test]
    fn the_judged_row_is_the_one_admission_answers_from() {
        assert!(judged("h", "e", &[], None).is_none());
        let gone = judged("h", "e", &[], Some(row("a", 5))).unwrap();
        assert!(gone.body.is_none(), "indexed, nothing stored: missing");
        let bodies = [body("a", 3)];
        let cut = judged("h", "e", &bodies, Some(row("a", 5))).unwrap();
        assert_eq!((cut.row.bytes, cut.body.map(|b| b.bytes)), (5, Some(3)));
        // A row naming a body that is gone, with another body stored: the stored one counts.
        let bodies = [body("b", 7)];
        let other = judged("h", "e", &bodies, Some(row("a", 5))).unwrap();
        assert_eq!((other.row.tar_sha256.as_str(), other.row.bytes), ("b", 7));
        assert_eq!(other.row.commit, "c");
    }

    #[test]
    fn etags_compare_without_quotes() {
        assert!(same_version(Some("\"x\""), Some("x")));
        assert!(!same_version(Some("x"), Some("y")));
        assert!(same_version(None, None));
    }
}
