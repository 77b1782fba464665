//! Spawning commands: each is echoed before it runs, and a failure names the command and
//! its exit status.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

unsafe extern "C" {
    // Declared here rather than pulling in libc for one call; it cannot fail.
    safe fn geteuid() -> u32;
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    geteuid() == 0
}

/// The first executable file called `name` on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;

    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| {
            file.metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Seconds since `start`, for the end of slow steps.
pub fn elapsed(start: Instant) -> String {
    format!("{:.1}s", start.elapsed().as_secs_f64())
}

/// The command as a person would type it into a shell.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        // Cargo commands run from the workspace root; say so only when that is not where
        // the person already is.
        Some(dir) if std::env::current_dir().ok().as_deref() != Some(dir) => {
            format!("(cd {} && {line})", quote(dir.as_os_str()))
        }
        _ => line,
    }
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn echo(cmd: &Command) {
    say!("$ {}", display(cmd));
}

fn could_not_start(cmd: &Command) -> String {
    format!("could not start `{}`", display(cmd))
}

fn check(cmd: &Command, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{}` failed: {status}", display(cmd))
    }
}

/// Runs a command with inherited stdio; an error unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    echo(cmd);
    let status = cmd.status().with_context(|| could_not_start(cmd))?;
    check(cmd, status)
}

/// Runs a command and returns its stdout; stderr is captured so a failure can quote it.
pub fn output(cmd: &mut Command) -> Result<String> {
    echo(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| could_not_start(cmd))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{}` failed: {}: {}",
            display(cmd),
            out.status,
            stderr.trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a check whose failure is an answer, not an error: its stdout when it succeeds,
/// `None` when it fails or cannot start.
pub fn probe(cmd: &mut Command) -> Option<String> {
    echo(cmd);
    let out = cmd.stdin(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, copying its stdout through to ours line by line and handing each line
/// to `on_line`; stderr is inherited.
pub fn run_tee(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result<()> {
    echo(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| could_not_start(cmd))?;
    let stdout = child
        .stdout
        .take()
        .context("child's stdout was not piped")?;
    let mut reader = BufReader::new(stdout);
    let mut ours = std::io::stdout().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading the output of `{}`", display(cmd)))?;
        if read == 0 {
            break;
        }
        // A closed stdout (`| head`) must not stop us draining the child, or it would
        // block on a full pipe.
        let _ = ours.write_all(&line).and_then(|()| ours.flush());
        on_line(&String::from_utf8_lossy(&line));
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", display(cmd)))?;
    check(cmd, status)
}

/// Replaces this process with the command; returns only when that fails.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    echo(cmd);
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!("could not exec `{}`", display(cmd)))
}

/// A command for something that needs root: as is when root, through `sudo` otherwise.
pub fn privileged(program: &str, sudo_flags: &[&str]) -> Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if find_program("sudo").is_none() {
        bail!("`{program}` needs root, and this is not root and has no sudo");
    }
    let mut cmd = Command::new("sudo");
    cmd.args(sudo_flags).arg(program);
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("dpkg-query");
        cmd.args(["-W", "-f=${Status}", "bpftool"]).env("A", "b c");
        assert_eq!(
            display(&cmd),
            "A='b c' dpkg-query -W '-f=${Status}' bpftool"
        );
    }
}
