//! What the registrar shows through its admin API: readiness and the
//! instances it checks, with their health and registration.

use crate::admin::Status;
use std::sync::Mutex;

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
}
