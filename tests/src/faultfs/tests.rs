//! The fault filesystem against its own model, and the durable-write helpers of
//! `cis490_common::durable` against a cut at every step.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use cis490_common::durable;

use super::{FaultFs, Loss, Ordering};

const BOTH: [Ordering; 2] = [Ordering::Journalled, Ordering::PerDirectory];

fn mounted(ordering: Ordering, test: &str) -> Option<(tempfile::TempDir, FaultFs)> {
    if !super::usable_or_skip(test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::mount(dir.path(), ordering).unwrap_or_else(|e| panic!("{e}"));
    Some((dir, fs))
}

fn fsync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

/// Makes `name` with `content` durably, the long way round through the mount.
fn durable_file(dir: &Path, name: &str, content: &[u8]) {
    let mut f = File::create(dir.join(name)).unwrap();
    f.write_all(content).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fsync_dir(dir);
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_write_and_fsync_survive_a_cut() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "a_write_and_fsync_survive_a_cut") else {
            return;
        };
        let m = fs.path().to_path_buf();
        durable_file(&m, "f", b"hello");
        let r = fs.power_cut(Loss::All).unwrap();
        assert_eq!(fs::read(m.join("f")).unwrap(), b"hello", "{ordering:?}");
        assert_eq!(r.files_rolled_back, 0);
        assert_eq!(r.changes_undone, 0);
    }
}

#[test]
fn a_write_without_fsync_is_lost_or_cut_short() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "a_write_without_fsync") else {
            return;
        };
        let m = fs.path().to_path_buf();
        durable_file(&m, "f", b"old");
        let mut f = OpenOptions::new().append(true).open(m.join("f")).unwrap();
        f.write_all(b"new bytes").unwrap();
        drop(f);
        assert_eq!(fs::read(m.join("f")).unwrap(), b"oldnew bytes");
        let r = fs.power_cut(Loss::All).unwrap();
        assert_eq!(fs::read(m.join("f")).unwrap(), b"old", "{ordering:?}");
        assert_eq!(r.files_rolled_back, 1);

        // Random loss keeps a prefix of the appended bytes, and over seeds every length shows.
        let mut lengths = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let mut f = OpenOptions::new().append(true).open(m.join("f")).unwrap();
            f.write_all(b"0123").unwrap();
            drop(f);
            fs.power_cut(Loss::Random(seed)).unwrap();
            let got = fs::read(m.join("f")).unwrap();
            assert!(
                got.starts_with(b"old") && b"old0123".starts_with(&got),
                "{got:?}"
            );
            lengths.insert(got.len());
            fs::write(fs.backing().join("f"), b"old").unwrap();
        }
        assert_eq!(lengths.len(), 5, "{lengths:?}");
    }
}

#[test]
fn an_overwrite_or_truncation_without_fsync_is_undone() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "an_overwrite") else {
            return;
        };
        let m = fs.path().to_path_buf();
        durable_file(&m, "f", b"0123456789");
        let f = OpenOptions::new().write(true).open(m.join("f")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"ab", 3).unwrap();
        f.set_len(5).unwrap();
        f.set_len(8).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"XYZ", 6).unwrap();
        drop(f);
        assert_eq!(fs::read(m.join("f")).unwrap(), b"012ab\0XYZ");
        fs.power_cut(Loss::All).unwrap();
        assert_eq!(
            fs::read(m.join("f")).unwrap(),
            b"0123456789",
            "{ordering:?}"
        );
    }
}

#[test]
fn a_create_without_a_directory_fsync_disappears() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "a_create_without_dir_fsync") else {
            return;
        };
        let m = fs.path().to_path_buf();
        fs::write(m.join("plain"), b"x").unwrap();
        let mut f = File::create(m.join("synced")).unwrap();
        f.write_all(b"data").unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs::create_dir(m.join("d")).unwrap();
        fs.power_cut(Loss::All).unwrap();
        // A journalling filesystem's fsync commits every entry made before it (but not the
        // other file's data); a per-directory one needs the directory's own fsync.
        match ordering {
            Ordering::Journalled => {
                assert_eq!(names(&m), ["plain", "synced"]);
                assert_eq!(fs::read(m.join("plain")).unwrap(), b"");
                assert_eq!(fs::read(m.join("synced")).unwrap(), b"data");
            }
            Ordering::PerDirectory => assert!(names(&m).is_empty(), "{:?}", names(&m)),
        }
    }
}

#[test]
fn a_directory_made_without_its_parents_fsync_takes_its_files_with_it() {
    let Some((_d, mut fs)) = mounted(Ordering::PerDirectory, "a_directory_made") else {
        return;
    };
    let m = fs.path().to_path_buf();
    fs::create_dir(m.join("d")).unwrap();
    durable_file(&m.join("d"), "f", b"in d");
    fs.power_cut(Loss::All).unwrap();
    assert!(names(&m).is_empty());
}

#[test]
fn a_rename_without_a_directory_fsync_is_undone() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "a_rename_without_dir_fsync") else {
            return;
        };
        let m = fs.path().to_path_buf();
        durable_file(&m, "a", b"A");
        durable_file(&m, "b", b"B");
        fs::rename(m.join("a"), m.join("b")).unwrap();
        assert_eq!(names(&m), ["b"]);
        let r = fs.power_cut(Loss::All).unwrap();
        assert_eq!(names(&m), ["a", "b"], "{ordering:?}");
        assert_eq!(fs::read(m.join("a")).unwrap(), b"A");
        assert_eq!(fs::read(m.join("b")).unwrap(), b"B");
        assert_eq!(r.changes_undone, 1);
        assert!(fs::read_dir(fs.backing().join("../grave"))
            .unwrap()
            .next()
            .is_none());
    }
}

#[test]
fn a_rename_with_a_directory_fsync_survives() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "a_rename_with_dir_fsync") else {
            return;
        };
        let m = fs.path().to_path_buf();
        durable_file(&m, "a", b"A");
        durable_file(&m, "b", b"B");
        fs::rename(m.join("a"), m.join("b")).unwrap();
        fsync_dir(&m);
        fs.power_cut(Loss::All).unwrap();
        assert_eq!(names(&m), ["b"], "{ordering:?}");
        assert_eq!(fs::read(m.join("b")).unwrap(), b"A");
    }
}

#[test]
fn a_rename_between_directories_needs_both_fsyncs_without_a_journal() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "a_rename_between_directories") else {
            return;
        };
        let m = fs.path().to_path_buf();
        for d in ["x", "y"] {
            fs::create_dir(m.join(d)).unwrap();
        }
        fsync_dir(&m);
        durable_file(&m.join("x"), "f", b"F");
        fs::rename(m.join("x/f"), m.join("y/f")).unwrap();
        fsync_dir(&m.join("y"));
        fs.power_cut(Loss::All).unwrap();
        // Journalled: the fsync of y commits the whole rename. Per directory: y's new entry
        // is on disk, x's removal is not, so the file has two names.
        let expect: &[&str] = match ordering {
            Ordering::Journalled => &[],
            Ordering::PerDirectory => &["f"],
        };
        assert_eq!(names(&m.join("x")), expect, "{ordering:?}");
        assert_eq!(fs::read(m.join("y/f")).unwrap(), b"F");
    }
}

#[test]
fn an_unlink_without_a_directory_fsync_is_undone() {
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "an_unlink_without_dir_fsync") else {
            return;
        };
        let m = fs.path().to_path_buf();
        durable_file(&m, "f", b"keep me");
        fs::create_dir(m.join("empty")).unwrap();
        fsync_dir(&m);
        fs::remove_file(m.join("f")).unwrap();
        fs::remove_dir(m.join("empty")).unwrap();
        assert!(names(&m).is_empty());
        fs.power_cut(Loss::All).unwrap();
        assert_eq!(names(&m), ["empty", "f"], "{ordering:?}");
        assert_eq!(fs::read(m.join("f")).unwrap(), b"keep me");
    }
}

#[test]
fn a_cut_kills_the_processes_using_the_mount() {
    let Some((_d, mut fs)) = mounted(Ordering::Journalled, "a_cut_kills") else {
        return;
    };
    let m = fs.path().to_path_buf();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3>>log; echo line >&3; sleep 60")
        .current_dir(&m)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::read(m.join("log")).map_or(true, |b| b.is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never wrote"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let r = fs.power_cut(Loss::All).unwrap();
    assert!(r.killed >= 1, "{r:?}"); // the shell, and its sleep if it forked one
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert!(names(&m).is_empty(), "log was never made durable");
}

/// What a cut may leave of a helper's work: the state before it or after it, never a mixture,
/// and once it returned, the state after it.
struct Case {
    name: &'static str,
    /// Puts the durable state before the helper straight into the backing directory.
    setup: fn(&Path),
    run: fn(&Path) -> std::io::Result<()>,
    /// Checks the state after the cut; `done` when the helper returned Ok.
    check: fn(&Path, bool, Ordering) -> Result<(), String>,
}

fn without_temps(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| !n.ends_with(durable::TEMP_SUFFIX))
        .collect()
}

const CASES: &[Case] = &[
    Case {
        name: "write_atomic over an old file",
        setup: |b| fs::write(b.join("f"), b"old content").unwrap(),
        run: |m| durable::write_atomic(&m.join("f"), b"new content, longer"),
        check: |m, done, _| {
            let got = fs::read(m.join("f")).map_err(|e| e.to_string())?;
            match (done, got.as_slice()) {
                (_, b"new content, longer") | (false, b"old content") => {}
                _ => return Err(format!("f holds {:?}", String::from_utf8_lossy(&got))),
            }
            match without_temps(m).as_slice() {
                [f] if f == "f" => Ok(()),
                other => Err(format!("entries {other:?}")),
            }
        },
    },
    Case {
        name: "write_atomic_private to a new file",
        setup: |_| {},
        run: |m| durable::write_atomic_private(&m.join("k"), b"secret"),
        check: |m, done, _| match (done, fs::read(m.join("k"))) {
            (_, Ok(b)) if b == b"secret" => Ok(()),
            (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            (_, other) => Err(format!("k: {other:?}")),
        },
    },
    Case {
        name: "DurableFile::create_in + commit(Keep)",
        setup: |_| {},
        run: |m| {
            let mut f = durable::DurableFile::create_in(m, "e")?;
            f.write_all(&[7u8; 10_000])?;
            f.commit(&m.join("e.tar.zst"), durable::Existing::Keep)
        },
        check: |m, done, _| match (done, fs::read(m.join("e.tar.zst"))) {
            (_, Ok(b)) if b == [7u8; 10_000] => Ok(()),
            (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            (_, Ok(b)) => Err(format!("e.tar.zst torn: {} bytes", b.len())),
            (_, Err(e)) => Err(format!("e.tar.zst: {e}")),
        },
    },
    Case {
        name: "DurableFile::create_at + sync + commit(Replace)",
        setup: |b| {
            fs::write(b.join("o.partial"), b"stale partial").unwrap();
            fs::write(b.join("o"), b"previous").unwrap();
        },
        run: |m| {
            let mut f = durable::DurableFile::create_at(&m.join("o.partial"))?;
            f.write_all(b"fresh")?;
            f.sync()?;
            f.commit(&m.join("o"), durable::Existing::Replace)
        },
        check: |m, done, _| {
            let got = fs::read(m.join("o")).map_err(|e| e.to_string())?;
            match (done, got.as_slice()) {
                (_, b"fresh") | (false, b"previous") => Ok(()),
                _ => Err(format!("o holds {:?}", String::from_utf8_lossy(&got))),
            }
        },
    },
    Case {
        name: "open_append + append_line to an existing log",
        setup: |b| fs::write(b.join("index.jsonl"), b"{\"a\":1}\n").unwrap(),
        run: |m| {
            let mut f = durable::open_append(&m.join("index.jsonl"))?;
            durable::append_line(&mut f, "{\"b\":2}")
        },
        check: |m, done, _| {
            let got = fs::read(m.join("index.jsonl")).map_err(|e| e.to_string())?;
            let full: &[u8] = b"{\"a\":1}\n{\"b\":2}\n";
            let ok = if done {
                got == full
            } else {
                got.starts_with(b"{\"a\":1}\n") && full.starts_with(&got)
            };
            ok.then_some(())
                .ok_or_else(|| format!("index holds {:?}", String::from_utf8_lossy(&got)))
        },
    },
    Case {
        name: "open_append + append_line to a new log",
        setup: |_| {},
        run: |m| {
            let mut f = durable::open_append(&m.join("new.jsonl"))?;
            durable::append_line(&mut f, "line")
        },
        check: |m, done, _| match (done, fs::read(m.join("new.jsonl"))) {
            (true, Ok(b)) if b == b"line\n" => Ok(()),
            (false, Ok(b)) if b"line\n".starts_with(&b) => Ok(()),
            (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            (_, other) => Err(format!("new.jsonl: {other:?}")),
        },
    },
    Case {
        name: "create_dir_durable",
        setup: |_| {},
        run: |m| durable::create_dir_durable(&m.join("outbox")),
        check: |m, done, _| {
            let there = m.join("outbox").is_dir();
            (there || !done)
                .then_some(())
                .ok_or_else(|| "outbox missing after create_dir_durable returned".into())
        },
    },
    Case {
        name: "create_dir_durable with a missing parent",
        setup: |_| {},
        run: |m| durable::create_dir_durable(&m.join("store/episodes")),
        check: |m, done, _| {
            let there = m.join("store/episodes").is_dir();
            (there || !done)
                .then_some(())
                .ok_or_else(|| "store/episodes missing after create_dir_durable returned".into())
        },
    },
    Case {
        name: "rename_durable of a directory between directories",
        setup: |b| {
            fs::create_dir_all(b.join("episodes/e1")).unwrap();
            fs::create_dir_all(b.join("shipped")).unwrap();
            fs::write(b.join("episodes/e1/meta.json"), b"{}").unwrap();
        },
        run: |m| durable::rename_durable(&m.join("episodes/e1"), &m.join("shipped/e1")),
        check: |m, done, _| {
            let at = |p: &str| fs::read(m.join(p).join("e1/meta.json")).ok();
            match (done, at("episodes"), at("shipped")) {
                (_, None, Some(b)) | (false, Some(b), None) if b == b"{}" => Ok(()),
                (_, a, b) => Err(format!("episodes/e1: {a:?}, shipped/e1: {b:?}")),
            }
        },
    },
    Case {
        name: "rename_durable of a file between directories",
        setup: |b| {
            fs::create_dir_all(b.join("x")).unwrap();
            fs::create_dir_all(b.join("y")).unwrap();
            fs::write(b.join("x/f"), b"F").unwrap();
        },
        run: |m| durable::rename_durable(&m.join("x/f"), &m.join("y/f")),
        check: |m, done, ordering| {
            let (x, y) = (fs::read(m.join("x/f")).ok(), fs::read(m.join("y/f")).ok());
            match (done, x.as_deref(), y.as_deref()) {
                (_, None, Some(b"F")) => Ok(()),
                // Not yet returned: either name (or, without a journal, both).
                (false, Some(b"F"), None | Some(b"F")) => Ok(()),
                // Without a journal the two directories are written independently, so the
                // removal can reach the disk without the new entry: the reason data_dir must be
                // on a journalling filesystem.
                (false, None, None) if ordering == Ordering::PerDirectory => Ok(()),
                (_, x, y) => Err(format!("x/f: {x:?}, y/f: {y:?}")),
            }
        },
    },
];

/// Empties the backing directory and lays `setup`'s state in it (durable by construction: it
/// never went through the mount).
fn reset(fs: &FaultFs, setup: fn(&Path)) {
    for e in fs::read_dir(fs.backing()).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    setup(fs.backing());
}

#[test]
fn the_durable_helpers_survive_a_cut_at_every_step() {
    let mut cuts = 0;
    for ordering in BOTH {
        let Some((_d, mut fs)) = mounted(ordering, "the_durable_helpers") else {
            return;
        };
        let m = fs.path().to_path_buf();
        for case in CASES {
            // How many changing requests the helper makes, uninterrupted.
            reset(&fs, case.setup);
            let before = fs.changes();
            (case.run)(&m).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let steps = fs.changes() - before;
            assert!(steps >= 2, "{}: only {steps} requests", case.name);
            for n in 0..=steps {
                for loss in [Loss::All, Loss::Random(n * 31 + 7), Loss::Random(n + 1000)] {
                    reset(&fs, case.setup);
                    // Settle the reset (no pending state) before arming.
                    fs.power_cut(Loss::All).unwrap();
                    fs.cut_after(n);
                    let done = (case.run)(&m).is_ok();
                    assert_eq!(done, n == steps, "{}: cut after {n} of {steps}", case.name);
                    fs.power_cut(loss).unwrap();
                    cuts += 1;
                    if let Err(e) = (case.check)(&m, done, ordering) {
                        panic!(
                            "{} ({ordering:?}, {loss:?}): cut after {n} of {steps} requests: {e}",
                            case.name
                        );
                    }
                }
            }
        }
    }
    eprintln!("the durable helpers: {cuts} cuts, every state legal");
}
