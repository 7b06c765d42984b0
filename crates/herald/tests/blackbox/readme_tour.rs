//! README's "A tour with curl", executed: every `sh` block of that section runs in order against a
//! fresh hub (the real binary, on a free port), and every output shown after a command, or marked
//! as a subscriber's stream, must be what the commands print. Normalised: event ids (compared as
//! offsets from the first id, so their order and spacing count), `date:` headers, uptimes, and
//! heartbeat comments. Markers are HTML comments, invisible on GitHub:
//! `<!-- tour: background NAME -->` before a command that keeps running (a subscriber),
//! `<!-- tour: stream NAME -->` before what that subscriber has printed so far, and
//! `<!-- tour: stream-end NAME -->` before how its output ends once the stream has ended.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::PATIENCE;

#[derive(Debug)]
enum Step {
    Run {
        command: String,
        output: Option<String>,
    },
    Background {
        name: String,
        command: String,
    },
    Stream {
        name: String,
        output: String,
        ended: bool,
    },
}

/// The steps of README's tour, in order.
fn tour() -> Vec<Step> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let start = readme
        .find("\n## A tour with curl\n")
        .expect("the tour section");
    let section = &readme[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |e| e + 1)];
    let mut steps = Vec::new();
    let mut marker: Option<(String, String)> = None;
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if let Some(m) = line.strip_prefix("<!-- tour: ") {
            let m = m.strip_suffix(" -->").expect("marker ends with -->");
            let (kind, name) = m.split_once(' ').expect("marker: KIND NAME");
            marker = Some((kind.to_string(), name.to_string()));
            continue;
        }
        let Some(lang) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        let step = match (lang, marker.take()) {
            ("sh", None) => Step::Run {
                command: body,
                output: None,
            },
            ("sh", Some((kind, name))) if kind == "background" => Step::Background {
                name,
                command: body,
            },
            (_, Some((kind, name))) if kind == "stream" || kind == "stream-end" => Step::Stream {
                name,
                output: body,
                ended: kind == "stream-end",
            },
            (_, None) => match steps.last_mut() {
                Some(Step::Run {
                    output: o @ None, ..
                }) => {
                    *o = Some(body);
                    continue;
                }
                _ => panic!("README tour: an output block follows no command:\n{body}"),
            },
            (lang, m) => panic!("README tour: unknown marker {m:?} on a {lang} block"),
        };
        steps.push(step);
    }
    steps
}

/// Ids as offsets from the first id seen on this side, dates and uptimes blanked, heartbeats gone.
struct Normaliser {
    base: Option<u128>,
}

impl Normaliser {
    fn apply(&mut self, text: &str) -> String {
        let mut text = text.replace("\r\n", "\n");
        while text.contains("\n\n:\n\n") {
            text = text.replace("\n\n:\n\n", "\n\n");
        }
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("date: ") {
                out.push_str("date: <date>\n");
                continue;
            }
            let mut rest = line;
            while let Some(i) = rest.find(|c: char| c.is_ascii_digit()) {
                out.push_str(&rest[..i]);
                let digits: String = rest[i..].chars().take_while(char::is_ascii_digit).collect();
                rest = &rest[i + digits.len()..];
                if out.ends_with("\"uptime_s\":") || out.ends_with("\"uptimeSeconds\":") {
                    out.push_str("<n>");
                } else if digits.len() >= 15 {
                    let id: u128 = digits.parse().unwrap();
                    let base = *self.base.get_or_insert(id);
                    out.push_str(&format!("<id{:+}>", id as i128 - base as i128));
                } else {
                    out.push_str(&digits);
                }
            }
            out.push_str(rest);
            out.push('\n');
        }
        out.trim_end().to_string()
    }
}

/// A process whose stdout is collected as it comes; killed when dropped.
struct Running {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn (bash and curl must be installed; scripts/test installs curl)");
        let mut stdout = child.stdout.take().unwrap();
        let out: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Running { child, out }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shell(command: &str, port: u16) -> Command {
    let command = command.replace("localhost:8080", &format!("127.0.0.1:{port}"));
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!("set -eo pipefail\n{command}"));
    c
}

#[test]
fn readme_tour_runs_from_a_fresh_hub_as_shown() {
    let steps = tour();
    assert!(steps.len() >= 15, "the tour has its commands: {steps:#?}");
    let mut hub = Command::new(env!("CARGO_BIN_EXE_herald"));
    hub.args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    let mut hub = Running::spawn(hub);
    let deadline = Instant::now() + PATIENCE;
    let port: u16 = loop {
        let text = hub.text();
        if let Some(line) = BufReader::new(text.as_bytes()).lines().next()
            && let Ok(line) = line
            && text.contains('\n')
        {
            let url = line
                .strip_prefix("herald listening on ")
                .expect("first line");
            break url.rsplit(':').next().unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "herald did not start");
        assert!(hub.child.try_wait().unwrap().is_none(), "herald exited");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut shown, mut got) = (Normaliser { base: None }, Normaliser { base: None });
    let mut background: Vec<(String, Running)> = Vec::new();
    let mut compared = 0;
    for step in &steps {
        match step {
            Step::Run { command, output } => {
                let out = shell(command, port).output().expect("run a command");
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "README tour: `{command}` failed: {}{stdout}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let output = output
                    .as_ref()
                    .unwrap_or_else(|| panic!("README tour: `{command}` shows no output"));
                let (want, have) = (shown.apply(output), got.apply(&stdout));
                assert_eq!(have, want, "README tour: the output of `{command}`");
                compared += 1;
            }
            Step::Background { name, command } => {
                let sub = Running::spawn(shell(command, port));
                let deadline = Instant::now() + PATIENCE;
                while !sub.text().contains(": herald\n") {
                    assert!(
                        Instant::now() < deadline,
                        "README tour: {name}'s stream did not open"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                background.push((name.clone(), sub));
            }
            Step::Stream {
                name,
                output,
                ended,
            } => {
                let sub = &mut background
                    .iter_mut()
                    .find(|(n, _)| n == name)
                    .unwrap_or_else(|| panic!("README tour: no subscriber {name}"))
                    .1;
                let want = shown.apply(output);
                let deadline = Instant::now() + PATIENCE;
                loop {
                    let exited = sub.child.try_wait().unwrap().is_some();
                    // Ids are normalised in order, so only a matching text moves `got`'s base.
                    let have = Normaliser { base: got.base }.apply(&sub.text());
                    let matches = if *ended {
                        exited && have.ends_with(&want)
                    } else {
                        have == want
                    };
                    if matches {
                        got.apply(&sub.text());
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "README tour: {name}'s stream{}\n--- shown:\n{want}\n--- got:\n{have}",
                        if *ended { " (ended)" } else { "" }
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                compared += 1;
            }
        }
    }
    assert!(compared >= 15, "compared {compared} outputs");
}
