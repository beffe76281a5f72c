//! Routes and weighted splits, compiled against a service's backends: a
//! request is matched against the rules in order, the first match draws
//! one of its targets by weight, and a target is a subset of the backends
//! (those carrying every tag it names) or another service.

use crate::policy::{HttpPolicy, RouteMatch};
use crate::proxy::balance::{random, BackendSet};
use hyper::Request;

/// What routing and hashing read of a request: the hyper path's
/// [`Request`] and the HTTP/1.1 fast path's parsed head alike.
pub trait Head {
    fn method(&self) -> &str;
    /// The path, without the query.
    fn path(&self) -> &str;
    /// Whether any `name` header's value passes `test` (names are
    /// lowercase; stops at the first that does).
    fn any_header(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool;
}

impl<B> Head for Request<B> {
    fn method(&self) -> &str {
        Request::method(self).as_str()
    }

    fn path(&self) -> &str {
        self.uri().path()
    }

    fn any_header(&self, name: &str, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.headers()
            .get_all(name)
            .iter()
            .any(|value| test(value.as_bytes()))
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Some of this service's backends (indices; `None`: all of them).
    Backends(Option<Vec<usize>>),
    /// Another service, by name.
    Service(String),
}

#[derive(Debug)]
struct Rule {
    matches: RouteMatch,
    targets: Vec<(Target, u64)>,
    total: u64,
}

/// A service's routes over one compiled backend set.
#[derive(Debug)]
pub struct Routes {
    rules: Vec<Rule>,
}

/// Every backend: what a request no rule matches gets.
static ALL: Target = Target::Backends(None);

impl Routes {
    /// Compiles `policy`'s rules against `set` (tags to backend indices).
    pub fn new(policy: &HttpPolicy, set: &BackendSet) -> Routes {
        let rules = policy
            .routes
            .iter()
            .map(|route| {
                let targets: Vec<(Target, u64)> = route
                    .to
                    .iter()
                    .map(|split| {
                        let target = match &split.service {
                            Some(service) => Target::Service(service.clone()),
                            None if split.tags.is_empty() => Target::Backends(None),
                            None => Target::Backends(Some(
                                set.backends()
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, b)| split.tags.iter().all(|tag| b.tags.contains(tag)))
                                    .map(|(i, _)| i)
                                    .collect(),
                            )),
                        };
                        (target, u64::from(split.weight))
                    })
                    .collect();
                let total = targets.iter().map(|(_, weight)| weight).sum();
                Rule {
                    matches: route.matches.clone(),
                    targets,
                    total,
                }
            })
            .collect();
        Routes { rules }
    }

    /// Where `request` goes: the first matching rule's target, drawn by
    /// weight; every backend if no rule matches.
    pub fn choose(&self, request: &impl Head) -> &Target {
        let Some(rule) = self.rules.iter().find(|rule| matches(&rule.matches, request)) else {
            return &ALL;
        };
        let mut ticket = random() % rule.total.max(1);
        for (target, weight) in &rule.targets {
            if ticket < *weight {
                return target;
            }
            ticket -= weight;
        }
        &rule.targets[0].0
    }
}

fn matches(rule: &RouteMatch, request: &impl Head) -> bool {
    let path = request.path();
    rule.path_exact.as_deref().is_none_or(|exact| path == exact)
        && rule
            .path_prefix
            .as_deref()
            .is_none_or(|prefix| path.starts_with(prefix))
        && rule
            .method
            .as_deref()
            .is_none_or(|method| request.method() == method)
        && rule
            .headers
            .iter()
            .all(|(name, value)| request.any_header(name.as_str(), &mut |got| got == value.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{parse_service, Balance, InstanceState, Label, Outlier};
    use crate::proxy::balance::Backend;

    fn set(tags: &[&[&str]]) -> BackendSet {
        let backends = tags
            .iter()
            .enumerate()
            .map(|(i, tags)| Backend {
                id: format!("b{i}").into(),
                host: "127.0.0.1".into(),
                port: 1,
                addr: None,
                congestion: None,
                weight: 1,
                zone: None,
                tags: tags.iter().map(|t| Label::new(t)).collect(),
                node: None,
                mesh: None,
                state: InstanceState::Up,
                stats: Default::default(),
            })
            .collect();
        BackendSet::new(backends, Balance::RoundRobin, Outlier::default(), None)
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_first_matching_rule_wins_and_splits_go_by_weight() {
        let spec = parse_service(
            b"{port: 80, protocol: http, http: {routes: [
                {match: {headers: {x-canary: '1'}}, to: [{tags: [v2]}]},
                {match: {path_prefix: /admin, method: POST}, to: [{service: admin}]},
                {match: {path_exact: /split}, to: [{tags: [v2], weight: 5}, {tags: [v1], weight: 95}]}]}}",
        )
        .unwrap();
        let routes = Routes::new(&spec.http, &set(&[&["v1"], &["v2", "x"], &["v1"]]));
        let v2 = Target::Backends(Some(vec![1]));
        let v1 = Target::Backends(Some(vec![0, 2]));
        assert_eq!(
            routes.choose(&request("GET", "/split", &[("x-canary", "1")])),
            &v2
        );
        assert_eq!(
            routes.choose(&request("POST", "/admin/x", &[])),
            &Target::Service("admin".into())
        );
        assert_eq!(
            routes.choose(&request("GET", "/admin/x", &[])),
            &ALL,
            "method must match"
        );
        assert_eq!(routes.choose(&request("GET", "/other", &[])), &ALL);
        let draws = 20_000;
        let canary = (0..draws)
            .filter(|_| routes.choose(&request("GET", "/split", &[])) == &v2)
            .count();
        let stable = (0..draws)
            .filter(|_| routes.choose(&request("GET", "/split", &[])) == &v1)
            .count();
        // 5% of 20k is 1000; five standard deviations (~31 each) either way.
        assert!((845..1155).contains(&canary), "{canary} of {draws} to the canary");
        assert!(
            (18_845..19_155).contains(&stable),
            "{stable} of {draws} to the stable set"
        );
    }
}
