//! The run context: which AI-agent flow run (agent, flow, run, user,
//! project, customer, trace) a process's usage belongs to. A process gets it
//! from its environment at exec (`env`) and, for the span's duration, from
//! spans it sends (`crate::context`); records carry it (`crate::report`).

/// The trace-context attributes that bind usage to an AI-agent flow.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct RunContext {
    /// `agent.id`.
    pub agent_id: Option<String>,
    /// `flow.id`.
    pub flow_id: Option<String>,
    /// `flow.run_id`.
    pub run_id: Option<String>,
    /// `user.id`.
    pub user_id: Option<String>,
    /// `project.id`.
    pub project_id: Option<String>,
    /// `customer.id`.
    pub customer_id: Option<String>,
    /// The W3C trace id (32 lowercase hex).
    pub trace_id: Option<String>,
}

impl RunContext {
    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        *self == RunContext::default()
    }

    /// Fills each unknown field from `parent` (a child inherits what it does not set).
    pub fn inherit(&mut self, parent: &RunContext) {
        fn fill(a: &mut Option<String>, b: &Option<String>) {
            if a.is_none() {
                a.clone_from(b);
            }
        }
        fill(&mut self.agent_id, &parent.agent_id);
        fill(&mut self.flow_id, &parent.flow_id);
        fill(&mut self.run_id, &parent.run_id);
        fill(&mut self.user_id, &parent.user_id);
        fill(&mut self.project_id, &parent.project_id);
        fill(&mut self.customer_id, &parent.customer_id);
        fill(&mut self.trace_id, &parent.trace_id);
    }

    /// Whether [`RunContext::set_attribute`] sets a field for `key`.
    pub fn is_context_key(key: &str) -> bool {
        matches!(
            key,
            "agent.id" | "flow.id" | "flow.run_id" | "user.id" | "project.id" | "customer.id"
        )
    }

    /// Sets the fields named by OpenTelemetry attribute keys (`flow.run_id`, …).
    pub fn set_attribute(&mut self, key: &str, value: &str) {
        let slot = match key {
            "agent.id" => &mut self.agent_id,
            "flow.id" => &mut self.flow_id,
            "flow.run_id" => &mut self.run_id,
            "user.id" => &mut self.user_id,
            "project.id" => &mut self.project_id,
            "customer.id" => &mut self.customer_id,
            _ => return,
        };
        if !value.is_empty() {
            *slot = Some(value.to_string());
        }
    }
}

/// The run context one set of OpenTelemetry attributes (a span's, a
/// resource's, `OTEL_RESOURCE_ATTRIBUTES`) names, with the GenAI semantic
/// conventions' agent identity kept apart: `agent.id` wins wherever it is
/// set (span, resource or environment), and `gen_ai.agent.id`, else
/// `gen_ai.agent.name`, else OpenInference's `agent.name` (what
/// openinference-instrumentation-openai-agents puts on an agent's span), names
/// the agent only where none is. Flows instrumented only with the GenAI
/// conventions (`invoke_agent` spans) or OpenInference then get per-agent
/// costs without a change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContextAttributes {
    /// The fields named by this project's keys (`flow.run_id`, `agent.id`, …).
    pub explicit: RunContext,
    genai_agent_id: Option<String>,
    genai_agent_name: Option<String>,
    openinference_agent_name: Option<String>,
    /// `gen_ai.operation.name`.
    operation: Option<String>,
    /// OpenInference's `openinference.span.kind`.
    span_kind: Option<String>,
}

impl ContextAttributes {
    /// Whether [`ContextAttributes::set`] reads `key`.
    pub fn is_key(key: &str) -> bool {
        RunContext::is_context_key(key)
            || matches!(
                key,
                "gen_ai.agent.id"
                    | "gen_ai.agent.name"
                    | "agent.name"
                    | "gen_ai.operation.name"
                    | "openinference.span.kind"
            )
    }

    /// Reads one attribute (others are ignored; empty values set nothing).
    pub fn set(&mut self, key: &str, value: &str) {
        let slot = match key {
            "gen_ai.agent.id" => &mut self.genai_agent_id,
            "gen_ai.agent.name" => &mut self.genai_agent_name,
            "agent.name" => &mut self.openinference_agent_name,
            "gen_ai.operation.name" => &mut self.operation,
            "openinference.span.kind" => &mut self.span_kind,
            _ => return self.explicit.set_attribute(key, value),
        };
        if !value.is_empty() {
            *slot = Some(value.to_string());
        }
    }

    /// The agent the GenAI attributes name: `gen_ai.agent.name`, else
    /// OpenInference's `agent.name`, else `gen_ai.agent.id`. The name first:
    /// it is what operators group costs by, and an instrumentation may stamp
    /// one default id on every agent (`opentelemetry-instrumentation-openai-agents-v2`
    /// 0.1.0 writes `gen_ai.agent.id = "agent"` on all of them).
    pub fn genai_agent(&self) -> Option<&String> {
        self.genai_agent_name
            .as_ref()
            .or(self.openinference_agent_name.as_ref())
            .or(self.genai_agent_id.as_ref())
    }

    /// Whether these are a span's attributes and the span is an agent's own
    /// (`invoke_agent` / `create_agent` by `gen_ai.operation.name` or its
    /// name, or OpenInference's AGENT kind): only an agent span's GenAI
    /// agent attributes name its agent. A model call or a tool that repeats
    /// them takes its agent from the agent span around it instead (the
    /// split's nesting, the token lineage), since instrumentations stamp
    /// defaults there (`gen_ai.agent.name = "OpenAI Agent"` on every call).
    pub fn is_agent_span(&self, span_name: &str) -> bool {
        let op = |o: &str| o == "invoke_agent" || o == "create_agent";
        self.operation.as_deref().is_some_and(op)
            || self
                .span_kind
                .as_deref()
                .is_some_and(|k| k.eq_ignore_ascii_case("agent"))
            || span_name.split_whitespace().next().is_some_and(op)
    }

    /// The context alone: the explicit fields, the GenAI agent where no `agent.id` is.
    pub fn context(&self) -> RunContext {
        let mut ctx = self.explicit.clone();
        if ctx.agent_id.is_none() {
            ctx.agent_id = self.genai_agent().cloned();
        }
        ctx
    }
}

/// The agent an `invoke_agent {gen_ai.agent.name}` span names by its name
/// (GenAI conventions), for a span that lacks the attribute.
pub fn invoke_agent_name(span_name: &str) -> Option<&str> {
    span_name
        .strip_prefix("invoke_agent ")
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> ContextAttributes {
        let mut a = ContextAttributes::default();
        for (k, v) in pairs {
            a.set(k, v);
        }
        a
    }

    #[test]
    fn agent_id_wins_over_the_genai_agent_whatever_the_order() {
        let a = attrs(&[("gen_ai.agent.name", "writer"), ("agent.id", "planner")]);
        assert_eq!(a.context().agent_id.as_deref(), Some("planner"));
        let a = attrs(&[
            ("gen_ai.agent.id", "agent"),
            ("gen_ai.agent.name", "writer"),
        ]);
        assert_eq!(
            a.context().agent_id.as_deref(),
            Some("writer"),
            "the name first"
        );
        let a = attrs(&[("gen_ai.agent.id", "asst_1")]);
        assert_eq!(a.context().agent_id.as_deref(), Some("asst_1"));
        let a = attrs(&[("gen_ai.agent.name", "writer"), ("flow.run_id", "r")]);
        assert_eq!(a.context().agent_id.as_deref(), Some("writer"));
        assert_eq!(a.explicit.agent_id, None);
        assert!(ContextAttributes::is_key("gen_ai.agent.name"));
        // OpenInference's agent span (openinference-instrumentation-openai-agents):
        // its `agent.name` names the agent, below the GenAI attributes.
        let a = attrs(&[("agent.name", "tutor"), ("graph.node.id", "tutor")]);
        assert_eq!(a.context().agent_id.as_deref(), Some("tutor"));
        let a = attrs(&[("agent.name", "tutor"), ("gen_ai.agent.name", "writer")]);
        assert_eq!(a.context().agent_id.as_deref(), Some("writer"));
        assert!(ContextAttributes::is_key("agent.name"));
        // Which spans are an agent's own.
        assert!(attrs(&[("gen_ai.operation.name", "invoke_agent")]).is_agent_span("x"));
        assert!(attrs(&[("openinference.span.kind", "AGENT")]).is_agent_span("triage"));
        assert!(attrs(&[]).is_agent_span("invoke_agent tutor"));
        assert!(attrs(&[]).is_agent_span("create_agent"));
        let chat = attrs(&[
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.agent.name", "OpenAI Agent"),
        ]);
        assert!(!chat.is_agent_span("chat gpt-4o"));
        assert!(!ContextAttributes::is_key("gen_ai.conversation.id"));
    }

    #[test]
    fn invoke_agent_spans_name_their_agent() {
        assert_eq!(
            invoke_agent_name("invoke_agent Math Tutor"),
            Some("Math Tutor")
        );
        assert_eq!(invoke_agent_name("invoke_agent "), None);
        assert_eq!(invoke_agent_name("invoke_agent"), None);
        assert_eq!(invoke_agent_name("chat gpt-4o"), None);
    }
}
