//! Certificates for the TLS and ACME tests, made with the openssl CLI in a temporary folder:
//! self-signed leaves for localhost, an expired copy, and a small CA with a leaf it signs. Plus
//! `curl` on an event stream, line by line, for tests that talk HTTPS like a user would.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::common::PATIENCE;

/// Certificates made by `openssl` in a temporary folder.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1: (cert, key).
    pub fn self_signed(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.files(name);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            // A leaf, not a CA: rustls (herald sub --ca) refuses a CA certificate as a server's.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        (cert, key)
    }

    /// The same key as `name`, with a certificate that expired yesterday.
    pub fn expired(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.self_signed(name);
        let old = self.path(&format!("{name}-expired.crt"));
        openssl(&[
            "x509",
            "-in",
            cert.to_str().unwrap(),
            "-signkey",
            key.to_str().unwrap(),
            "-days",
            "-1",
            "-out",
            old.to_str().unwrap(),
        ]);
        (old, key)
    }

    /// A self-signed CA (`name`), and a leaf for localhost and 127.0.0.1 that it signs:
    /// (CA cert, leaf cert, leaf key).
    pub fn ca_and_leaf(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (ca, ca_key) = self.files(&format!("{name}-ca"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            ca_key.to_str().unwrap(),
            "-out",
            ca.to_str().unwrap(),
        ]);
        let (cert, key) = self.files(name);
        let csr = self.path(&format!("{name}.csr"));
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ]);
        let ext = self.path(&format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        (ca, cert, key)
    }

    fn files(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        )
    }
}

pub fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl CLI is needed (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--tls-cert CERT --tls-key KEY`.
pub fn tls_args<'a>(cert: &'a Path, key: &'a Path) -> [&'a str; 4] {
    [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]
}

/// `curl -sSN -i` on an event stream; its output read line by line.
pub struct Curl {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Curl {
    pub fn open(url: &str, args: &[&str]) -> Curl {
        let mut child = Command::new("curl")
            .args(["-sSN", "-i", "-H", "accept: text/event-stream"])
            .args(args)
            .arg(url)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("curl is needed");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Curl {
            _child: child,
            lines,
        }
    }

    /// Reads lines until one satisfies `want`; returns it.
    pub async fn until(&mut self, want: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut seen = String::new();
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("curl printed nothing expected in time: {seen}"))
                .expect("read curl's output")
                .unwrap_or_else(|| panic!("curl's output ended: {seen}"));
            if want(&line) {
                return line;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
    }

    /// The status line, then the stream's opening (its `retry:` line).
    pub async fn opened(&mut self) -> String {
        let status = self.until(|l| l.starts_with("HTTP/")).await;
        self.until(|l| l.starts_with("retry:")).await;
        status
    }
}

/// Runs curl to completion; returns (success, stdout, stderr).
pub async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new("curl").arg("-sS").args(args).output(),
    )
    .await
    .expect("curl finished in time")
    .expect("curl is needed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
