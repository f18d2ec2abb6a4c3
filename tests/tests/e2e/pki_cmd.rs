//! `cis490-receiver pki init | issue | list` (SPEC §14) as a lab admin runs them, with the
//! certificates they make used for real: a receiver serving with them and hosts connecting.

use std::path::{Path, PathBuf};
use std::process::Command;

use cis490_tests::client::Client;
use cis490_tests::episode;
use cis490_tests::harness::{receiver_bin, Process, World};
use cis490_tests::pki::CertFiles;

fn pki(args: &[&str]) -> (i32, String, String) {
    cis490_tests::harness::output(Command::new(receiver_bin()).arg("pki").args(args))
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every file below `dir` with its bytes, to show a refused command changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A receiver config serving with the certificates of `pki_dir`.
fn receiver_config(w: &World, pki_dir: &Path) -> PathBuf {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nstore_dir = \"{store}\"\n\n[tls]\ncert_file = \"{d}/receiver.pem\"\nkey_file = \"{d}/receiver.key\"\nclient_ca_file = \"{d}/ca.pem\"\n\n[version_gate]\nrepo_path = \"{repo}\"\nrefresh_interval_s = 1\n",
        store = w.store_dir().display(),
        d = pki_dir.display(),
        repo = w.repo.path.display(),
    );
    let p = w.path().join("receiver-pki.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn host_files(pki_dir: &Path, host: &str) -> CertFiles {
    let d = pki_dir.join("hosts").join(host);
    CertFiles {
        cert: d.join(format!("{host}.pem")),
        key: d.join(format!("{host}.key")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_made_by_pki_bind_each_host_and_a_renewal_needs_no_restart() {
    let w = World::new(2);
    let dir = w.path().join("lab-pki");
    let d = dir.to_str().unwrap();
    let (code, out, err) = pki(&[
        "init",
        "--dir",
        d,
        "--name",
        "localhost",
        "--name",
        "127.0.0.1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("client_ca_file"),
        "prints the [tls] lines: {out}"
    );
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("receiver.key")), 0o600);

    let (code, out, err) = pki(&["issue", "lab-01", "--dir", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("cert_file = \"/etc/cis490/lab-01.pem\""),
        "{out}"
    );
    assert!(out.contains("scp "), "{out}");
    let files = host_files(&dir, "lab-01");
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(
        std::fs::read(dir.join("hosts/lab-01/ca.pem")).unwrap(),
        std::fs::read(dir.join("ca.pem")).unwrap()
    );

    let p = Process::start(&receiver_config(&w, &dir), &[]);
    let ca = dir.join("ca.pem");
    let c = Client::new(p.addr, &ca, &files);
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[1], 2_000);
    let a = c.put("lab-01", &b).await;
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let b2 = episode::body(&w.path().join("src"), "ep-2", &w.commits[1], 2_000);
    let a = c.put("lab-02", &b2).await;
    assert_eq!(a.status, 403, "lab-01's certificate is not lab-02's");
    assert_eq!(a.error(), "forbidden");

    // Renewal: a new key and serial under the same CA, accepted by the running receiver.
    let old_cert = std::fs::read(&files.cert).unwrap();
    let (code, out, _) = pki(&["issue", "lab-01", "--dir", d]);
    assert_eq!(code, 0);
    assert!(out.starts_with("renewed lab-01"), "{out}");
    assert_ne!(std::fs::read(&files.cert).unwrap(), old_cert);
    let c = Client::new(p.addr, &ca, &host_files(&dir, "lab-01"));
    let b3 = episode::body(&w.path().join("src"), "ep-3", &w.commits[1], 2_000);
    assert_eq!(c.put("lab-01", &b3).await.status, 201);
}

#[test]
fn list_exits_1_when_a_certificate_expires_within_30_days() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("lab");
    let d = d.to_str().unwrap();
    assert_eq!(pki(&["init", "--dir", d]).0, 0);
    assert_eq!(pki(&["issue", "lab-01", "--dir", d]).0, 0);
    let (code, out, err) = pki(&["list", "--dir", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().count(),
        4,
        "header, CA, receiver, lab-01: {out}"
    );
    assert_eq!(pki(&["issue", "lab-02", "--dir", d, "--days", "10"]).0, 0);
    let (code, out, err) = pki(&["list", "--dir", d]);
    assert_eq!(code, 1, "{out}{err}");
    let first = out.lines().nth(1).unwrap();
    assert!(
        first.starts_with("RENEW") && first.contains("lab-02"),
        "soonest first: {out}"
    );
    assert!(err.contains("pki issue HOST_ID"), "{err}");
    let (code, json, _) = pki(&["list", "--dir", d, "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["subject"], "CN=lab-02");
    assert!(v[0]["days_left"].as_i64().unwrap() <= 10);
    // A revoked certificate is listed as such and no longer asks for renewal.
    assert_eq!(pki(&["revoke", "lab-02", "--dir", d]).0, 0);
    let (code, out, _) = pki(&["list", "--dir", d]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("revoked") && l.contains("lab-02")),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn init_twice_refuses_and_bad_host_ids_are_refused_changing_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let d = dir.to_str().unwrap();
    assert_eq!(pki(&["init", "--dir", d]).0, 0);
    assert_eq!(pki(&["issue", "lab-01", "--dir", d]).0, 0);
    let before = snapshot(&dir);
    let (code, _, err) = pki(&["init", "--dir", d]);
    assert_eq!(code, 1);
    assert!(err.contains("already holds a CA"), "{err}");
    assert_eq!(snapshot(&dir), before, "init twice changed nothing");
    for bad in ["a/b", "..", "lab 01", "../../etc", ""] {
        let (code, _, err) = pki(&["issue", bad, "--dir", d]);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(err.contains("host id"), "{err}");
        assert_eq!(snapshot(&dir), before, "{bad:?} changed nothing");
    }
    let (code, _, err) = pki(&[
        "init",
        "--dir",
        tmp.path().join("x").to_str().unwrap(),
        "--name",
        "not a name",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        !tmp.path().join("x").exists(),
        "a refused init creates nothing"
    );
}

#[test]
fn issue_refuses_a_missing_or_mismatched_ca_and_never_leaves_half_a_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let other = tmp.path().join("other");
    let (l, o) = (lab.to_str().unwrap(), other.to_str().unwrap());
    // No CA at all.
    let (code, _, err) = pki(&["issue", "lab-01", "--dir", l]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ca.pem"), "names the file: {err}");
    assert!(!lab.join("hosts").exists());
    // A key that is not the CA certificate's.
    assert_eq!(pki(&["init", "--dir", l]).0, 0);
    assert_eq!(pki(&["init", "--dir", o]).0, 0);
    assert_eq!(pki(&["issue", "lab-01", "--dir", l]).0, 0);
    let before = snapshot(&lab);
    std::fs::copy(other.join("ca.key"), lab.join("ca.key")).unwrap();
    let (code, _, err) = pki(&["issue", "lab-01", "--dir", l]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("ca.key") && err.contains("is not the key"),
        "{err}"
    );
    let after = snapshot(&lab);
    let host_files = |s: &[(PathBuf, Vec<u8>)]| -> Vec<(PathBuf, Vec<u8>)> {
        s.iter()
            .filter(|(p, _)| p.starts_with(lab.join("hosts")))
            .cloned()
            .collect()
    };
    assert_eq!(
        host_files(&after),
        host_files(&before),
        "the host's bundle is untouched"
    );
}

#[test]
fn list_names_a_file_that_is_not_a_certificate_and_lists_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let l = lab.to_str().unwrap();
    assert_eq!(pki(&["init", "--dir", l]).0, 0);
    assert_eq!(pki(&["issue", "lab-01", "--dir", l]).0, 0);
    assert_eq!(pki(&["issue", "lab-02", "--dir", l]).0, 0);
    std::fs::write(lab.join("hosts/lab-02/lab-02.pem"), "not pem at all\n").unwrap();
    let (code, out, err) = pki(&["list", "--dir", l]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("hosts/lab-02/lab-02.pem"), "{err}");
    assert!(
        out.contains("hosts/lab-01/lab-01.pem") && out.contains("ca.pem"),
        "{out}"
    );
}

#[test]
fn a_renewal_leaves_a_key_that_matches_its_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let l = lab.to_str().unwrap();
    assert_eq!(pki(&["init", "--dir", l]).0, 0);
    for _ in 0..3 {
        assert_eq!(pki(&["issue", "lab-01", "--dir", l]).0, 0);
        let files = host_files(&lab, "lab-01");
        // rustls refuses a certificate/key pair that do not belong together.
        let cfg = cis490_common::tls::client_config(
            &cis490_common::tls::ClientTlsFiles {
                ca_file: &lab.join("ca.pem"),
                cert_file: &files.cert,
                key_file: &files.key,
            },
            false,
        );
        assert!(cfg.is_ok(), "{:?}", cfg.err());
        let names: Vec<String> = std::fs::read_dir(lab.join("hosts"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["lab-01"], "no staging directory is left behind");
    }
}
