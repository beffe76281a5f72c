//! What the registrar shows through its admin API: readiness and the
//! instances it checks, with their health and registration.

use super::check::CheckStats;
use crate::admin::Status;
use crate::telemetry::{families, Exposition};
use std::sync::{Arc, Mutex};

/// The registrar's published state.
#[derive(Default)]
pub struct RegistrarStatus {
    inner: Mutex<Published>,
}

#[derive(Clone, Default)]
pub struct Published {
    pub node: String,
    pub store: String,
    /// Every desired registration is in the store.
    pub settled: bool,
    pub instances: Vec<serde_json::Value>,
    /// Each instance checked, for `/metrics`.
    pub checks: Vec<Checked>,
}

/// One instance's metrics.
#[derive(Clone)]
pub struct Checked {
    pub service: String,
    pub instance: String,
    pub registered: bool,
    pub checks: Arc<CheckStats>,
}

impl RegistrarStatus {
    pub fn publish(&self, published: Published) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = published;
    }

    fn current(&self) -> Published {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Status for RegistrarStatus {
    /// Ready once the store holds what the checks say (an unreachable
    /// store makes it unready, though its registrations live on).
    fn ready(&self) -> (bool, serde_json::Value) {
        let now = self.current();
        let reasons: Vec<&str> = if now.settled {
            Vec::new()
        } else {
            vec!["registrations not yet written to the store (unreachable?)"]
        };
        let body = serde_json::json!({
            "ready": now.settled,
            "reasons": reasons,
            "node": now.node,
            "store": now.store,
        });
        (now.settled, body)
    }

    fn view(&self, path: &str) -> Option<serde_json::Value> {
        (path == "/instances").then(|| serde_json::Value::Array(self.current().instances))
    }

    fn views(&self) -> &'static [(&'static str, &'static str)] {
        &[(
            "/instances",
            "each backend: key, health, flagged state, mesh address (JSON)",
        )]
    }

    /// The series of the instances configured now: an instance no longer
    /// configured has none.
    fn metrics(&self, out: &mut Exposition<'_>) {
        let checked = self.current().checks;
        let mut family = out.family(&families::REGISTRAR_REGISTERED);
        for c in &checked {
            family.value(&[&c.service, &c.instance], u8::from(c.registered));
        }
        let mut family = out.family(&families::REGISTRAR_CHECKS_TOTAL);
        for c in &checked {
            family.value(&[&c.service, &c.instance, "pass"], c.checks.passed.get());
            family.value(&[&c.service, &c.instance, "fail"], c.checks.failed.get());
        }
        let mut family = out.family(&families::REGISTRAR_CHECK_DURATION_SECONDS);
        for c in &checked {
            family.histogram(&[&c.service, &c.instance], &c.checks.duration);
        }
    }
}
