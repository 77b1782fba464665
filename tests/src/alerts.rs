//! Independent receivers of the agent's alert notifications, started by the
//! tests: an HTTP receiver (webhook, Slack and PagerDuty shapes, and
//! Alertmanager's own webhook) in Python with its own HMAC check
//! (`py/alert_receiver.py`), an SMTP server (`py/smtp_receiver.py`, aiosmtpd,
//! STARTTLS with a test CA made by the openssl CLI), and Debian's
//! `prometheus-alertmanager` on free ports with a temporary storage and no
//! clustering. None of them shares code with the agent.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{daemon::free_port, http, traced::py_script};

/// How long a receiver may take to start listening (a loaded 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process killed when dropped.
#[derive(Debug)]
struct Kid(Option<Child>);

impl Kid {
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for "ready <port>" in `stdout` (the scripts print it when listening).
fn wait_ready(kid: &mut Kid, stdout: &Path, log: &Path) -> Result<u16> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(port) = fs::read_to_string(stdout)
            .ok()
            .and_then(|s| s.strip_prefix("ready ")?.trim().parse().ok())
        {
            return Ok(port);
        }
        if let Some(c) = kid.0.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!(
                "the receiver exited ({status}) before listening: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("the receiver did not listen within {START_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a JSON-lines file (missing: none yet).
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `py/alert_receiver.py`: records every POST as a JSON line.
#[derive(Debug)]
pub struct HttpReceiver {
    kid: Kid,
    /// Its port on 127.0.0.1.
    pub port: u16,
    out: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    starts: u32,
}

impl HttpReceiver {
    /// Starts one in `dir` on a free port; `secret_file`: check signatures
    /// with it; `status`: answer every request with it.
    pub fn start(dir: &Path, secret_file: Option<&Path>, status: Option<u16>) -> Result<Self> {
        let mut args = Vec::new();
        if let Some(s) = secret_file {
            args.extend(["--secret-file".to_string(), s.display().to_string()]);
        }
        if let Some(s) = status {
            args.extend(["--status".to_string(), s.to_string()]);
        }
        let mut r = Self {
            kid: Kid(None),
            port: 0,
            out: dir.join(format!("receiver-{}.jsonl", free_port()?)),
            dir: dir.to_path_buf(),
            args,
            starts: 0,
        };
        r.port = r.spawn(0)?;
        Ok(r)
    }

    fn spawn(&mut self, port: u16) -> Result<u16> {
        self.starts += 1;
        let stdout = self.out.with_extension(format!("{}.stdout", self.starts));
        let log = self.out.with_extension(format!("{}.log", self.starts));
        let child = Command::new("python3")
            .arg(py_script("alert_receiver.py"))
            .args(["--port", &port.to_string(), "--out"])
            .arg(&self.out)
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting python3 py/alert_receiver.py")?;
        self.kid = Kid(Some(child));
        wait_ready(&mut self.kid, &stdout, &log)
    }

    /// `http://127.0.0.1:<port>` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Stops it (an outage: connections are refused).
    pub fn stop(&mut self) {
        self.kid.stop();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn(self.port) {
                Ok(_) => return Ok(()),
                // The port may linger a moment after the kill.
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        json_lines(&self.out)
    }
}

/// `py/smtp_receiver.py`: records every mail as a JSON line.
#[derive(Debug)]
pub struct SmtpReceiver {
    _kid: Kid,
    /// Its port on 127.0.0.1.
    pub port: u16,
    out: PathBuf,
}

impl SmtpReceiver {
    /// Starts one in `dir`; `tls`: (certificate, key) to offer and require STARTTLS.
    pub fn start(dir: &Path, tls: Option<(&Path, &Path)>) -> Result<Self> {
        let tag = free_port()?;
        let out = dir.join(format!("smtp-{tag}.jsonl"));
        let stdout = dir.join(format!("smtp-{tag}.stdout"));
        let log = dir.join(format!("smtp-{tag}.log"));
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("smtp_receiver.py"))
            .arg("--out")
            .arg(&out);
        if let Some((cert, key)) = tls {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting python3 py/smtp_receiver.py (needs aiosmtpd: cargo xtask setup)")?;
        let mut kid = Kid(Some(child));
        let port = wait_ready(&mut kid, &stdout, &log)?;
        Ok(Self {
            _kid: kid,
            port,
            out,
        })
    }

    /// Every mail received so far.
    pub fn mails(&self) -> Vec<serde_json::Value> {
        json_lines(&self.out)
    }
}

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost.
#[derive(Debug)]
pub struct TestCa {
    /// The CA's certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's key (PEM).
    pub key: PathBuf,
}

/// Makes a [`TestCa`] in `dir` with the openssl CLI.
pub fn test_ca(dir: &Path) -> Result<TestCa> {
    let p = |n: &str| dir.join(n);
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    ca_args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mentat test CA",
    ]);
    run(&ca_args)?;
    let mut csr_args = vec!["req"];
    csr_args.extend(ec);
    csr_args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&csr_args)?;
    fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])?;
    Ok(TestCa {
        ca: p("ca.pem"),
        cert: p("server.pem"),
        key: p("server.key"),
    })
}

/// Debian's Alertmanager, routing every alert to a webhook receiver with `send_resolved`.
#[derive(Debug)]
pub struct Alertmanager {
    _kid: Kid,
    /// Its base URL.
    pub url: String,
}

impl Alertmanager {
    /// Starts `/usr/bin/prometheus-alertmanager` in `dir` (storage there),
    /// grouping by alertname with 1 s waits, notifying `webhook_url`.
    pub fn start(dir: &Path, webhook_url: &str) -> Result<Self> {
        Self::start_on(dir, webhook_url, free_port()?)
    }

    /// As [`Alertmanager::start`], on `port` (one an agent was told of before it came up).
    pub fn start_on(dir: &Path, webhook_url: &str, port: u16) -> Result<Self> {
        let config = dir.join("alertmanager.yml");
        fs::write(
            &config,
            format!(
                "route:\n  receiver: hook\n  group_by: ['alertname']\n  group_wait: 1s\n  \
                 group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n- name: hook\n  \
                 webhook_configs:\n  - url: '{webhook_url}'\n    send_resolved: true\n"
            ),
        )?;
        let storage = dir.join("am-data");
        fs::create_dir_all(&storage)?;
        let log = dir.join("alertmanager.log");
        let child = Command::new("/usr/bin/prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", storage.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting /usr/bin/prometheus-alertmanager (cargo xtask setup installs it)")?;
        let am = Self {
            _kid: Kid(Some(child)),
            url: format!("http://127.0.0.1:{port}"),
        };
        let ready = format!("{}/-/ready", am.url);
        crate::daemon::poll(START_TIMEOUT, || {
            let r = http::get(&ready, &[], None)?;
            Ok(if r.status == 200 {
                Ok(())
            } else {
                Err(format!("HTTP {}", r.status))
            })
        })
        .with_context(|| {
            format!(
                "alertmanager not ready: {}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        Ok(am)
    }

    /// `GET /api/v2/alerts` (active, silenced, inhibited and unprocessed ones).
    pub fn alerts(&self) -> Result<Vec<serde_json::Value>> {
        let r = http::get(&format!("{}/api/v2/alerts", self.url), &[], None)?;
        match r.json()? {
            serde_json::Value::Array(a) => Ok(a),
            other => bail!("GET /api/v2/alerts: not a list: {other}"),
        }
    }
}
