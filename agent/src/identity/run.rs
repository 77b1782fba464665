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
