//! Resource-level run context: a process whose OpenTelemetry resource (not
//! only a span) names `flow.run_id` belongs to that run for its whole life,
//! as a process whose environment names it does (`identity::env`). Its SDK's
//! start-up before the first span and its export work after the last one are
//! then the run's too, not only the time its spans cover.
//!
//! In: spans the inbox admitted, with their host pid resolved and the
//! sender the kernel identified. Out: per process, the run context its
//! resource named, from when; `report` reads it as the process's own context
//! (over its environment's) for windows it splits after the binding arrived.
//! Windows committed before a process's first export keep its environment's
//! context: nothing is rewritten.
//!
//! Bounded: [`MAX_BOUND_PROCESSES`] processes, [`MAX_SEGMENTS`] distinct
//! contexts each (a resource is fixed per SDK instance; a process that makes
//! a new one per run changes context, from that run's first span on);
//! bindings past either bound are refused and counted. A binding is dropped
//! once its process is gone and no window it could be in is left to split.

use std::{collections::HashMap, sync::Arc};

use crate::{context::spans::Span, identity::process::instance_start, identity::run::RunContext};

/// Processes with a resource-level binding kept at most.
pub const MAX_BOUND_PROCESSES: usize = 65_536;
/// Distinct resource contexts kept per process.
pub const MAX_SEGMENTS: usize = 16;

#[derive(Clone, Debug)]
struct ProcessBinding {
    /// The instance's start (as the collector keys it), when the kernel
    /// identified the sender as this process: a later process reusing the
    /// pid is not bound by it.
    start_ns: Option<u64>,
    /// (from Unix ns, context): the first holds from the process's start.
    segments: Vec<(u64, Arc<RunContext>)>,
    /// When it was first seen gone (Unix ns), at a window's split.
    gone_seen_unix_ns: Option<u64>,
}

/// Resource-level run contexts of processes, by host pid.
#[derive(Clone, Debug, Default)]
pub struct ProcessBindings {
    by_pid: HashMap<u32, ProcessBinding>,
    /// Descendants of bound processes, by instance, on a window's snapshot
    /// (see [`ProcessBindings::bind_descendant`]).
    descendants: HashMap<(u32, u64), Arc<RunContext>>,
    refused: u64,
}

impl ProcessBindings {
    /// Binds `span`'s process to its resource's run context, if the resource
    /// names a run; a no-op for spans without one or without a host pid.
    pub fn bind(&mut self, span: &Span) {
        let (Some(pid), Some(ctx)) = (span.pid, span.resource_context.as_ref()) else {
            return;
        };
        // The kernel's word on which instance sent it; a trusted
        // forwarder's claim names a pid, not an instance.
        let start_ns = span
            .sender
            .filter(|s| !s.trusted && s.pid == pid)
            .map(|s| instance_start(s.start_ns));
        if let Some(b) = self.by_pid.get_mut(&pid) {
            if start_ns.is_some() && b.start_ns.is_some() && b.start_ns != start_ns {
                // The pid was reused: the old process's binding is over.
                *b = ProcessBinding {
                    start_ns,
                    segments: vec![(0, ctx.clone())],
                    gone_seen_unix_ns: None,
                };
                return;
            }
            b.start_ns = b.start_ns.or(start_ns);
            b.gone_seen_unix_ns = None;
            if b.segments.iter().any(|(_, c)| **c == **ctx) {
                return;
            }
            if b.segments.len() >= MAX_SEGMENTS {
                self.refused += 1;
                return;
            }
            b.segments.push((span.start_unix_ns, ctx.clone()));
            b.segments.sort_by_key(|(from, _)| *from);
            return;
        }
        if self.by_pid.len() >= MAX_BOUND_PROCESSES {
            self.refused += 1;
            return;
        }
        self.by_pid.insert(
            pid,
            ProcessBinding {
                start_ns,
                segments: vec![(0, ctx.clone())],
                gone_seen_unix_ns: None,
            },
        );
    }

    /// Binds instance (`pid`, `start_ns`) as a descendant of a bound
    /// process, with that process's context: a bound process's children
    /// (its tools, its shell helpers) are its run's, as an environment's
    /// context is inherited. The window's split finds the ancestors.
    pub fn bind_descendant(&mut self, pid: u32, start_ns: u64, context: Arc<RunContext>) {
        self.descendants.insert((pid, start_ns), context);
    }

    /// The context instance (`pid`, `start_ns`) is bound to itself at
    /// `at_unix_ns`, shared.
    pub fn own_binding(&self, pid: u32, start_ns: u64, at_unix_ns: u64) -> Option<Arc<RunContext>> {
        self.segment(pid, start_ns, at_unix_ns).cloned()
    }

    /// The run context instance (`pid`, `start_ns`) is bound to at
    /// `at_unix_ns`: its own binding, else its bound ancestor's.
    pub fn context_at(&self, pid: u32, start_ns: u64, at_unix_ns: u64) -> Option<&RunContext> {
        self.segment(pid, start_ns, at_unix_ns)
            .or_else(|| self.descendants.get(&(pid, start_ns)))
            .map(|c| &**c)
    }

    fn segment(&self, pid: u32, start_ns: u64, at_unix_ns: u64) -> Option<&Arc<RunContext>> {
        let b = self.by_pid.get(&pid)?;
        if b.start_ns.is_some_and(|s| s != start_ns) {
            return None;
        }
        b.segments
            .iter()
            .rev()
            .find(|(from, _)| *from <= at_unix_ns)
            .or_else(|| b.segments.first())
            .map(|(_, c)| c)
    }

    /// Drops the bindings of processes gone since an earlier split: `alive`
    /// says whether (pid, start) is still running; one gone is kept until a
    /// window starting after it was seen gone (`split_from`) is split, since
    /// the windows closed before then (held for late spans) may hold its
    /// usage.
    pub fn forget_gone(
        &mut self,
        now_unix_ns: u64,
        split_from: u64,
        alive: impl Fn(u32, Option<u64>) -> bool,
    ) {
        self.by_pid.retain(|&pid, b| {
            if alive(pid, b.start_ns) {
                b.gone_seen_unix_ns = None;
                return true;
            }
            match b.gone_seen_unix_ns {
                Some(gone) => split_from <= gone,
                None => {
                    b.gone_seen_unix_ns = Some(now_unix_ns);
                    true
                }
            }
        });
    }

    /// Processes bound now.
    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// Whether no process is bound.
    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// Bindings refused at a bound.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::spans::SpanSender;

    fn resource_span(pid: u32, sender_start: u64, run: &str, start: u64) -> Span {
        let ctx = RunContext {
            run_id: Some(run.into()),
            ..Default::default()
        };
        Span {
            pid: Some(pid),
            start_unix_ns: start,
            end_unix_ns: start + 1,
            resource_context: Some(Arc::new(ctx)),
            sender: Some(SpanSender {
                pid,
                start_ns: sender_start,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn run(b: &ProcessBindings, pid: u32, start: u64, at: u64) -> Option<String> {
        b.context_at(pid, start, at).and_then(|c| c.run_id.clone())
    }

    #[test]
    fn a_resource_run_binds_the_process_from_its_start_and_only_that_instance() {
        let mut b = ProcessBindings::default();
        let start = instance_start(5_000_000_000);
        b.bind(&resource_span(7, 5_000_000_000, "r1", 100));
        // Before its first span too: the whole life.
        assert_eq!(run(&b, 7, start, 1).as_deref(), Some("r1"));
        // Another instance with the pid is not bound; nor is another pid.
        assert_eq!(run(&b, 7, start + 10_000_000_000, 1), None);
        assert_eq!(run(&b, 8, start, 1), None);
        // A span without a resource run binds nothing.
        let mut plain = resource_span(9, 1, "x", 1);
        plain.resource_context = None;
        b.bind(&plain);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_new_resource_context_holds_from_its_first_span_and_pid_reuse_replaces() {
        let mut b = ProcessBindings::default();
        let s = instance_start(1_000_000_000);
        b.bind(&resource_span(7, 1_000_000_000, "r1", 100));
        b.bind(&resource_span(7, 1_000_000_000, "r2", 500));
        assert_eq!(run(&b, 7, s, 499).as_deref(), Some("r1"));
        assert_eq!(run(&b, 7, s, 500).as_deref(), Some("r2"));
        // The pid reused by a later process: its own binding, from its start.
        let s2 = instance_start(9_000_000_000);
        b.bind(&resource_span(7, 9_000_000_000, "r3", 900));
        assert_eq!(run(&b, 7, s2, 1).as_deref(), Some("r3"));
        assert_eq!(run(&b, 7, s, 600), None);
    }

    #[test]
    fn a_descendant_takes_its_ancestors_binding_unless_bound_itself() {
        let mut b = ProcessBindings::default();
        b.bind(&resource_span(7, 1_000_000_000, "parent", 100));
        let ctx = b.own_binding(7, 1_000_000_000, 100).expect("bound");
        b.bind_descendant(8, 2_000_000_000, ctx.clone());
        assert_eq!(run(&b, 8, 2_000_000_000, 1).as_deref(), Some("parent"));
        assert_eq!(
            run(&b, 8, 3_000_000_000, 1),
            None,
            "another instance of pid 8"
        );
        b.bind_descendant(7, 1_000_000_000, Arc::new(RunContext::default()));
        assert_eq!(
            run(&b, 7, 1_000_000_000, 1).as_deref(),
            Some("parent"),
            "its own wins"
        );
    }

    #[test]
    fn bounds_refuse_and_count() {
        let mut b = ProcessBindings::default();
        for i in 0..MAX_SEGMENTS as u64 + 2 {
            b.bind(&resource_span(1, 1, &format!("r{i}"), i));
        }
        assert_eq!(b.refused(), 2);
        for pid in 2..=MAX_BOUND_PROCESSES as u32 + 1 {
            b.bind(&resource_span(pid, 1, "r", 1));
        }
        assert_eq!(b.len(), MAX_BOUND_PROCESSES);
        assert_eq!(b.refused(), 3);
    }

    #[test]
    fn a_gone_process_is_kept_until_no_held_window_can_hold_it() {
        let mut b = ProcessBindings::default();
        b.bind(&resource_span(7, 1, "r1", 100));
        b.forget_gone(1_000, 900, |_, _| true);
        assert_eq!(b.len(), 1);
        // Seen gone at 2,000: windows starting before then may still hold it.
        b.forget_gone(2_000, 1_000, |_, _| false);
        b.forget_gone(2_500, 2_000, |_, _| false);
        assert_eq!(b.len(), 1);
        b.forget_gone(3_000, 2_001, |_, _| false);
        assert!(b.is_empty());
    }
}
