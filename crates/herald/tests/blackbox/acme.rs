//! Certificates from ACME against a real ACME server: Debian's `pebble` (Let's Encrypt's test
//! server) on loopback, with `pebble-challtestsrv` as its DNS so that the test name resolves to
//! 127.0.0.1 and pebble really validates TLS-ALPN-01 against herald's HTTPS port. The served chain
//! is checked with `openssl s_client` against pebble's root; with pebble issuing 30-second
//! certificates, herald renews one under an open stream without a restart.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};

use crate::common::{PATIENCE, Server, free_port};
use crate::pki::{Curl, Pki};

const NAME: &str = "herald.test";

fn spawn(program: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed (Debian package pebble): {e}"))
}

/// Waits for a listener on `port`; pebble makes its RSA issuers first, slow on a loaded machine.
async fn wait_port(port: u16) {
    let deadline = tokio::time::Instant::now() + 6 * PATIENCE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// pebble and its DNS on loopback, and herald ordering a certificate for [`NAME`] from it.
struct Acme {
    server: Server,
    /// pebble's root, which signs the issued chains (a new one each pebble run).
    root: PathBuf,
    cache: PathBuf,
    _pki: Pki,
    _pebble: Child,
    _dns: Child,
}

impl Acme {
    /// Starts pebble (issuing certificates valid for `validity_secs`, when given) and herald
    /// with `--acme-*` pointed at it.
    async fn start(validity_secs: Option<u64>) -> Acme {
        let pki = Pki::new();
        let (ca, pebble_cert, pebble_key) = pki.ca_and_leaf("pebble");
        let (acme_port, mgmt_port, dns_port, dns_mgmt_port, herald_port) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let mut config = json!({
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": pebble_cert,
            "privateKey": pebble_key,
            "httpPort": free_port(),
            // Where pebble connects to validate TLS-ALPN-01: herald's HTTPS port.
            "tlsPort": herald_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        });
        if let Some(secs) = validity_secs {
            config["certificateValidityPeriod"] = json!(secs);
        }
        let config_path = pki.path("pebble.json");
        std::fs::write(&config_path, json!({ "pebble": config }).to_string()).unwrap();
        // Every name resolves to 127.0.0.1 (and to no IPv6 address).
        let dns = spawn(
            "pebble-challtestsrv",
            &[
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-management",
                &format!("127.0.0.1:{dns_mgmt_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ],
            &[],
        );
        let pebble = spawn(
            "pebble",
            &[
                "-config",
                config_path.to_str().unwrap(),
                "-dnsserver",
                &format!("127.0.0.1:{dns_port}"),
            ],
            // No random waits, and no nonces rejected on purpose.
            &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
        );
        wait_port(acme_port).await;
        wait_port(dns_mgmt_port).await;

        let cache = pki.path("acme-cache");
        let server = Server::start_logged(&[
            "--listen",
            &format!("127.0.0.1:{herald_port}"),
            "--acme-domain",
            NAME,
            "--acme-directory",
            &format!("https://127.0.0.1:{acme_port}/dir"),
            "--acme-contact",
            "mailto:admin@herald.test",
            "--acme-cache",
            cache.to_str().unwrap(),
            "--acme-ca-root",
            ca.to_str().unwrap(),
            // A loopback listener answers only loopback names unless told otherwise.
            "--allowed-host",
            NAME,
            "--allowed-host",
            "127.0.0.1",
        ])
        .await;
        assert!(server.url.starts_with("https://"), "{}", server.url);

        let root = pki.path("root.pem");
        let fetched = Command::new("curl")
            .args(["-sS", "-k", "-o", root.to_str().unwrap()])
            .arg(format!("https://127.0.0.1:{mgmt_port}/roots/0"))
            .status()
            .await
            .unwrap();
        assert!(fetched.success());
        Acme {
            server,
            root,
            cache,
            _pki: pki,
            _pebble: pebble,
            _dns: dns,
        }
    }

    /// `--cacert ROOT --resolve NAME:PORT:127.0.0.1`, for curl.
    fn curl_trust(&self) -> [String; 4] {
        [
            "--cacert".into(),
            self.root.to_str().unwrap().into(),
            "--resolve".into(),
            format!("{NAME}:{}:127.0.0.1", self.server.port),
        ]
    }

    fn url(&self, path: &str) -> String {
        format!("https://{NAME}:{}{path}", self.server.port)
    }

    /// Waits until herald serves a certificate from pebble (verified by curl against its root).
    async fn until_served(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new("curl")
                .args(["-sS", "--http2"])
                .args(self.curl_trust())
                .arg(self.url("/stats"))
                .output()
                .await
                .unwrap();
            if out.status.success() {
                assert!(String::from_utf8_lossy(&out.stdout).contains("\"connections\""));
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no certificate from pebble in time; herald logged:\n{}",
                self.server.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `openssl s_client` on a new connection, verifying against pebble's root: its output.
    async fn s_client(&self) -> String {
        let out = Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{}", self.server.port))
            .args(["-servername", NAME, "-showcerts", "-verify_return_error"])
            .args(["-CAfile", self.root.to_str().unwrap(), "-alpn", "h2"])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many times herald logged a newly obtained certificate.
    fn issued(&self) -> usize {
        self.server
            .log
            .lock()
            .unwrap()
            .matches("ACME: obtained a new certificate")
            .count()
    }
}

/// The first certificate (the leaf) in `openssl s_client -showcerts` output, as PEM.
fn leaf(s_client: &str) -> String {
    let start = s_client
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate served: {s_client}"));
    let end = s_client[start..].find("-----END CERTIFICATE-----").unwrap();
    s_client[start..start + end].to_string()
}

#[tokio::test]
async fn herald_obtains_a_certificate_from_pebble_by_tls_alpn_01_and_serves_it() {
    let acme = Acme::start(None).await;
    acme.until_served().await;
    acme.server
        .log_line("ACME: obtained a new certificate")
        .await;

    // The chain as served: leaf for the name, issued by pebble, verifying up to its root.
    let text = acme.s_client().await;
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("Pebble Intermediate"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    // The account and the certificate are cached for the next start.
    assert!(std::fs::read_dir(&acme.cache).unwrap().count() >= 2);
}

/// pebble issues certificates valid for 30 s; rustls-acme renews once two thirds of a
/// certificate's lifetime have passed (20 s). The same herald process then serves a new leaf to
/// new connections, while a stream opened under the first certificate keeps receiving events.
#[tokio::test]
async fn a_short_lived_certificate_is_renewed_without_a_restart_under_an_open_stream() {
    let acme = Acme::start(Some(30)).await;
    acme.until_served().await;
    let first = acme.s_client().await;
    assert!(first.contains("Verify return code: 0 (ok)"), "{first}");
    let pid = acme.server.pid();

    let trust = acme.curl_trust();
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let mut args = vec!["--http2"];
    args.extend(&trust);
    let mut h2 = Curl::open(&acme.url("/events?topic=renewal"), &args);
    h2.opened().await;
    let mut args = vec!["--http1.1"];
    args.extend(&trust);
    let mut h1 = Curl::open(&acme.url("/events?topic=renewal"), &args);
    h1.opened().await;

    // The renewal: a second certificate obtained, and served to a new connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while acme.issued() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal in time; herald logged:\n{}",
            acme.server.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let renewed = acme.s_client().await;
    assert!(renewed.contains("Verify return code: 0 (ok)"), "{renewed}");
    assert_ne!(
        leaf(&first),
        leaf(&renewed),
        "the same leaf is still served"
    );
    assert_eq!(acme.server.pid(), pid);

    // Both streams opened under the first certificate go on.
    acme.server
        .publish(json!({"topic": "renewal", "data": "after renewal"}))
        .await;
    for stream in [&mut h2, &mut h1] {
        assert_eq!(
            stream.until(|l| l.starts_with("data:")).await,
            "data: after renewal"
        );
    }
}
