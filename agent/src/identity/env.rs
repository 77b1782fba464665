//! Which AI-agent flow run a process belongs to by its environment at exec.
//!
//! Only `TRACEPARENT`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` are
//! kept, from the kernel's copy of the environment block taken at exec (so a
//! process that exits at once keeps its own context), or from
//! `/proc/<pid>/environ` where the copy was cut or lost; nothing else from the
//! environment is kept or logged (it holds secrets). A process without its own
//! context inherits its parent's, so a run's subprocesses stay in the run.
//! Spans (`context`) bind usage to runs for their duration; `report::split`
//! divides usage between the two sources.

use std::{fs, io::Read, path::Path};

use crate::identity::run::{ContextAttributes, RunContext};

/// What a process's environment says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvContext {
    /// The run context (from `OTEL_RESOURCE_ATTRIBUTES`, and `TRACEPARENT`'s trace id).
    pub context: RunContext,
    /// `OTEL_SERVICE_NAME`, or `service.name` from the resource attributes.
    pub service: Option<String>,
    /// `TRACEPARENT` was set but malformed (ignored, counted).
    pub bad_traceparent: bool,
}

/// Why a `TRACEPARENT` value was ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceparentError {
    /// Not four dash-separated fields of the right lengths.
    #[error("traceparent {0:?} is not version-traceid-spanid-flags")]
    Shape(String),
    /// A field is not lowercase hex, or an id is all zeros, or the version is ff.
    #[error("traceparent {0:?} has an invalid field")]
    Field(String),
}

/// Parses a W3C `traceparent` into (trace id, parent span id).
pub fn parse_traceparent(v: &str) -> Result<(String, String), TraceparentError> {
    let v = v.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let (version, trace, span, flags) = match parts.as_slice() {
        [a, b, c, d, ..] => (*a, *b, *c, *d),
        _ => return Err(TraceparentError::Shape(v.to_string())),
    };
    // Version 00 has exactly four fields; later versions may append more.
    if version.len() != 2
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
        || (version == "00" && parts.len() != 4)
    {
        return Err(TraceparentError::Shape(v.to_string()));
    }
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !hex(version)
        || !hex(trace)
        || !hex(span)
        || !hex(flags)
        || version == "ff"
        || zero(trace)
        || zero(span)
    {
        return Err(TraceparentError::Field(v.to_string()));
    }
    Ok((trace.to_string(), span.to_string()))
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`, values percent-encoded)
/// into the run context and the service name.
pub fn parse_resource_attributes(v: &str) -> (RunContext, Option<String>) {
    let mut attrs = ContextAttributes::default();
    let mut service = None;
    for pair in v.split(',') {
        let Some((k, val)) = pair.split_once('=') else {
            continue;
        };
        let (k, val) = (k.trim(), percent_decode(val.trim()));
        if k == "service.name" {
            service = Some(val);
        } else {
            attrs.set(k, &val);
        }
    }
    (attrs.context(), service)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(h) = b.get(i + 1..i + 3)
            && let Some(v) = std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The context in raw `/proc/<pid>/environ` bytes, reading only the allowlist.
pub fn context_from_environ(environ: &[u8]) -> EnvContext {
    let mut env = EnvContext::default();
    let mut trace_id = None;
    for entry in environ.split(|&b| b == 0) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (name, value) = (&entry[..eq], &entry[eq + 1..]);
        match name {
            b"TRACEPARENT" => match std::str::from_utf8(value).map(parse_traceparent) {
                Ok(Ok((trace, _))) => trace_id = Some(trace),
                _ => env.bad_traceparent = true,
            },
            b"OTEL_RESOURCE_ATTRIBUTES" => {
                let (ctx, service) = parse_resource_attributes(&String::from_utf8_lossy(value));
                env.context = ctx;
                if env.service.is_none() {
                    env.service = service;
                }
            }
            b"OTEL_SERVICE_NAME" => env.service = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
    env.context.trace_id = trace_id;
    env
}

/// An environment can be large; the allowlisted variables are what matter,
/// and a cap keeps a hostile environment from costing the agent memory.
const ENVIRON_LIMIT: u64 = 1 << 20;

/// Reads and parses `/proc/<pid>/environ` (needs ptrace-read access).
pub fn read_env_context(proc_root: &Path, pid: u32) -> Option<EnvContext> {
    let f = fs::File::open(proc_root.join(pid.to_string()).join("environ")).ok()?;
    let mut buf = Vec::new();
    f.take(ENVIRON_LIMIT).read_to_end(&mut buf).ok()?;
    Some(context_from_environ(&buf))
}

/// One process's usage in one window, split between runs.
#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_and_rejects() {
        assert_eq!(
            parse_traceparent(TP),
            Ok((
                "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                "00f067aa0ba902b7".into()
            ))
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_the_allowlist_is_read_from_the_environment() {
        let env = format!(
            "PATH=/bin\0AWS_SECRET_ACCESS_KEY=hunter2\0TRACEPARENT={TP}\0OTEL_RESOURCE_ATTRIBUTES=flow.id=f1,flow.run_id=r%2C1,agent.id=a,user.id=u,project.id=p,customer.id=c,service.name=svc\0\0garbage\0"
        );
        let e = context_from_environ(env.as_bytes());
        assert_eq!(e.context.run_id.as_deref(), Some("r,1"));
        assert_eq!(e.context.flow_id.as_deref(), Some("f1"));
        assert_eq!(e.context.customer_id.as_deref(), Some("c"));
        assert_eq!(
            e.context.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(e.service.as_deref(), Some("svc"));
        assert!(!e.bad_traceparent);
        assert!(!format!("{e:?}").contains("hunter2"));
        let bad = context_from_environ(b"TRACEPARENT=nonsense\0");
        assert!(bad.bad_traceparent && bad.context.trace_id.is_none());
    }
}
