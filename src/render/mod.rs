//! Rendering: tera templates and confd-style template resources.
//!
//! Two resources are always rendered: the routing table (one file per
//! service, so a change rewrites only the services it touched) and the DNS
//! zone. The config may add more (HAProxy, /etc/hosts, env files...). Each
//! resource names the catalog parts it reads (`keys`), and is re-rendered
//! only when one of those parts changed.

pub mod owner;
pub mod sync;
pub mod view;

use crate::catalog::{Catalog, Touch};
use crate::config::{AgentConfig, BuiltinCheck, Each, KeyKind, TemplateResource};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use sync::{FileSpec, Outcome};
use tera::Tera;
use view::{Context, Globals};

/// Templates built into the binary, used when no templates directory is set
/// and as fallbacks for names the directory lacks.
pub const BUILTIN_TEMPLATES: [(&str, &str); 5] = [
    (
        "routes.json.tera",
        include_str!("../../templates/routes.json.tera"),
    ),
    ("zone.tera", include_str!("../../templates/zone.tera")),
    (
        "haproxy.cfg.tera",
        include_str!("../../templates/haproxy.cfg.tera"),
    ),
    ("hosts.tera", include_str!("../../templates/hosts.tera")),
    ("env.tera", include_str!("../../templates/env.tera")),
];

/// Per-service passes at least this large are spread over threads.
const PARALLEL_FROM: usize = 256;

/// Most threads a render pass uses.
const MAX_RENDER_THREADS: usize = 4;

/// What rendering one service's file did.
enum ServiceOutcome {
    Written(PathBuf),
    Removed(PathBuf),
    Unchanged,
    /// Not served and no file to remove.
    Absent,
}

/// File name of the rendered DNS zone inside the state directory.
pub const ZONE_FILE: &str = "mesh.zone";

/// A template or output that could not be produced or put in place.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot load templates from {dir}: {reason}")]
    Load { dir: PathBuf, reason: String },
    #[error("template resource {src}: no such template (looked in {dir} and the built-in templates)")]
    MissingTemplate { src: String, dir: String },
    #[error("template resource {src}: unknown {what} {name:?}")]
    Owner {
        src: String,
        what: &'static str,
        name: String,
    },
    #[error("template {src} for {dest}: {reason}; kept the previous file")]
    Template {
        src: String,
        dest: PathBuf,
        reason: String,
    },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{what} failed for {dest}: {reason}; kept the previous file")]
    Check {
        dest: PathBuf,
        what: String,
        reason: String,
    },
    #[error("reload_cmd `{cmd}` after {dest} changed failed: {reason}")]
    Reload {
        cmd: String,
        dest: PathBuf,
        reason: String,
    },
}

/// What changed since the last render pass.
#[derive(Debug, Default, Clone)]
pub struct Dirty {
    all: bool,
    services: BTreeMap<String, BTreeSet<KeyKind>>,
}

impl Dirty {
    /// Everything must be rendered (start, snapshot, resync).
    pub fn everything() -> Self {
        Dirty {
            all: true,
            services: BTreeMap::new(),
        }
    }

    pub fn mark_all(&mut self) {
        self.all = true;
        self.services.clear();
    }

    pub fn touch(&mut self, touches: impl IntoIterator<Item = Touch>) {
        if self.all {
            return;
        }
        for (service, kind) in touches {
            self.services.entry(service).or_default().insert(kind);
        }
    }

    pub fn merge(&mut self, other: Dirty) {
        if other.all {
            self.mark_all();
        } else {
            self.touch(
                other
                    .services
                    .into_iter()
                    .flat_map(|(s, kinds)| kinds.into_iter().map(move |k| (s.clone(), k))),
            );
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }

    /// Whether everything is to be rendered.
    pub fn is_full(&self) -> bool {
        self.all
    }

    fn touches_any(&self, keys: &[KeyKind]) -> bool {
        self.all
            || self
                .services
                .values()
                .any(|kinds| keys.iter().any(|k| kinds.contains(k)))
    }

    fn services_touching<'a>(&'a self, keys: &'a [KeyKind]) -> impl Iterator<Item = &'a str> + 'a {
        self.services
            .iter()
            .filter(move |(_, kinds)| keys.iter().any(|k| kinds.contains(k)))
            .map(|(name, _)| name.as_str())
    }
}

/// The result of one render pass.
#[derive(Debug, Default)]
pub struct Report {
    pub written: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
    pub unchanged: usize,
    pub failures: Vec<RenderError>,
    /// What failed and should be tried again on the next pass.
    pub retry: Dirty,
    pub elapsed: Duration,
}

/// A template resource ready to render.
struct Resource {
    def: TemplateResource,
    dest: PathBuf,
    spec: FileSpec,
}

impl Resource {
    /// For per-service resources: the directory, and the text around `{service}`.
    fn split_dest(&self) -> (PathBuf, String, String) {
        let dir = self.dest.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = self
            .dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (before, after) = name.split_once("{service}").unwrap_or((&name, ""));
        (dir, before.to_string(), after.to_string())
    }

    fn service_dest(&self, service: &str) -> PathBuf {
        let (dir, before, after) = self.split_dest();
        dir.join(format!("{before}{service}{after}"))
    }
}

/// Settings the renderer needs from the agent config.
#[derive(Debug, Clone)]
pub struct RenderSettings {
    pub zone: String,
    pub ttl: u32,
    pub dns_address: Ipv4Addr,
    pub node: String,
    pub node_zone: Option<String>,
}

/// Renders the catalog into files.
pub struct Renderer {
    tera: Tera,
    settings: RenderSettings,
    resources: Vec<Resource>,
}

/// The routing table and zone resources every agent renders.
pub fn core_resources() -> Vec<TemplateResource> {
    let resource = |src: &str, dest: String, each, keys, check| TemplateResource {
        src: src.into(),
        dest: dest.into(),
        each,
        keys,
        owner: None,
        group: None,
        mode: None,
        check_cmd: None,
        reload_cmd: None,
        check,
    };
    vec![
        resource(
            "routes.json.tera",
            format!("{}/{{service}}.json", crate::routing::ROUTES_DIR),
            Each::Service,
            vec![KeyKind::Services, KeyKind::Instances, KeyKind::Addresses],
            Some(BuiltinCheck::Route),
        ),
        resource(
            "zone.tera",
            ZONE_FILE.into(),
            Each::Catalog,
            vec![KeyKind::Services, KeyKind::Addresses],
            None,
        ),
    ]
}

/// Loads the built-in templates, then the directory's (which override them).
pub fn load_templates(dir: Option<&Path>) -> Result<Tera, RenderError> {
    let mut tera = Tera::default();
    tera.autoescape_on(vec![]);
    tera.add_raw_templates(BUILTIN_TEMPLATES)
        .map_err(|err| RenderError::Load {
            dir: PathBuf::from("(built-in)"),
            reason: error_chain(&err),
        })?;
    if let Some(dir) = dir {
        let load_err = |reason: String| RenderError::Load {
            dir: dir.to_path_buf(),
            reason,
        };
        let listing = std::fs::read_dir(dir).map_err(|err| load_err(err.to_string()))?;
        let mut files = Vec::new();
        for item in listing {
            let path = item.map_err(|err| load_err(err.to_string()))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.is_file() && !name.starts_with('.') {
                files.push((path, Some(name)));
            }
        }
        tera.add_template_files(files)
            .map_err(|err| load_err(error_chain(&err)))?;
    }
    Ok(tera)
}

/// A tera error and its causes on one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.dedup();
    parts.join(": ").split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Renderer {
    /// Loads templates and prepares every resource; fails on the first problem.
    pub fn new(config: &AgentConfig, dns_address: Ipv4Addr) -> Result<Self, RenderError> {
        let tera = load_templates(config.templates_dir.as_deref())?;
        let settings = RenderSettings {
            zone: config.dns.zone.clone(),
            ttl: config.dns.ttl,
            dns_address,
            node: config.node_name(),
            node_zone: config.node_zone.clone(),
        };
        let mut resources = Vec::new();
        for def in core_resources()
            .into_iter()
            .chain(config.templates.iter().cloned())
        {
            if !tera.get_template_names().any(|name| name == def.src) {
                return Err(RenderError::MissingTemplate {
                    src: def.src.clone(),
                    dir: config
                        .templates_dir
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|| "(no templates_dir)".into()),
                });
            }
            let owner_err = |what, name: &String| RenderError::Owner {
                src: def.src.clone(),
                what,
                name: name.clone(),
            };
            let uid = match &def.owner {
                Some(name) => Some(owner::uid_of(name).ok_or_else(|| owner_err("user", name))?),
                None => None,
            };
            let gid = match &def.group {
                Some(name) => Some(owner::gid_of(name).ok_or_else(|| owner_err("group", name))?),
                None => None,
            };
            let spec = FileSpec {
                mode: def.mode_bits().ok().flatten(),
                uid,
                gid,
                check_cmd: def.check_cmd.clone(),
                check: def.check,
                command_timeout: config.render.command_timeout,
            };
            resources.push(Resource {
                dest: config.dest_path(&def),
                def,
                spec,
            });
        }
        Ok(Renderer {
            tera,
            settings,
            resources,
        })
    }

    /// Renders what `dirty` says changed; never panics, never removes a good
    /// file because a new render failed.
    pub fn render(&mut self, catalog: &Catalog, dirty: &Dirty) -> Report {
        let started = Instant::now();
        let mut report = Report::default();
        let globals = Globals {
            zone: self.settings.zone.clone(),
            zone_name: self.settings.zone.trim_end_matches('.').to_string(),
            ttl: self.settings.ttl,
            dns_address: self.settings.dns_address,
            node: self.settings.node.clone(),
            node_zone: self.settings.node_zone.clone(),
            revision: catalog.revision(),
        };
        for resource in &self.resources {
            if !dirty.touches_any(&resource.def.keys) {
                continue;
            }
            let changed_before = report.written.len() + report.removed.len();
            match resource.def.each {
                Each::Catalog => self.render_catalog(resource, catalog, &globals, &mut report),
                Each::Service => self.render_services(resource, catalog, dirty, &globals, &mut report),
            }
            let changed = report.written.len() + report.removed.len() > changed_before;
            if let (true, Some(cmd)) = (changed, &resource.def.reload_cmd) {
                if let Err(reason) = sync::run_command(cmd, resource.spec.command_timeout) {
                    report.failures.push(RenderError::Reload {
                        cmd: cmd.clone(),
                        dest: resource.dest.clone(),
                        reason,
                    });
                }
            }
        }
        report.elapsed = started.elapsed();
        report
    }

    fn render_catalog(&self, resource: &Resource, catalog: &Catalog, globals: &Globals, report: &mut Report) {
        let with_instances = resource.def.keys.contains(&KeyKind::Instances);
        let context = Context {
            globals,
            key: "services",
            value: view::service_views(catalog, with_instances),
        };
        let result = self.render_file(resource, &context, &resource.dest);
        match result {
            Ok(Outcome::Written) => report.written.push(resource.dest.clone()),
            Ok(Outcome::Unchanged) => report.unchanged += 1,
            Err(err) => {
                report.failures.push(err);
                report.retry.mark_all();
            }
        }
    }

    fn render_services(
        &self,
        resource: &Resource,
        catalog: &Catalog,
        dirty: &Dirty,
        globals: &Globals,
        report: &mut Report,
    ) {
        let mut targets: BTreeSet<String> = BTreeSet::new();
        if dirty.all {
            targets.extend(catalog.entries().keys().cloned());
            targets.extend(self.existing_service_files(resource));
        } else {
            targets.extend(dirty.services_touching(&resource.def.keys).map(str::to_string));
        }
        let with_instances = resource.def.keys.contains(&KeyKind::Instances);
        let targets: Vec<String> = targets.into_iter().collect();
        let render = |service: &String| {
            let result = self.render_service(resource, catalog, service, with_instances, globals);
            (service.clone(), result)
        };
        // A full render of thousands of files is mostly file creation in the
        // kernel; spread it over the cores. Small passes stay on this thread.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_RENDER_THREADS);
        let results: Vec<_> = if targets.len() < PARALLEL_FROM || threads < 2 {
            targets.iter().map(render).collect()
        } else {
            let chunk = targets.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let workers: Vec<_> = targets
                    .chunks(chunk)
                    .map(|part| scope.spawn(move || part.iter().map(render).collect::<Vec<_>>()))
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|worker| worker.join().expect("render worker panicked"))
                    .collect()
            })
        };
        for (service, result) in results {
            match result {
                Ok(ServiceOutcome::Written(dest)) => report.written.push(dest),
                Ok(ServiceOutcome::Removed(dest)) => report.removed.push(dest),
                Ok(ServiceOutcome::Unchanged) => report.unchanged += 1,
                Ok(ServiceOutcome::Absent) => {}
                Err(err) => {
                    report.failures.push(err);
                    report
                        .retry
                        .touch(resource.def.keys.iter().map(|k| (service.clone(), *k)));
                }
            }
        }
    }

    /// Renders (or removes) one service's file of a per-service resource.
    fn render_service(
        &self,
        resource: &Resource,
        catalog: &Catalog,
        service: &str,
        with_instances: bool,
        globals: &Globals,
    ) -> Result<ServiceOutcome, RenderError> {
        let dest = resource.service_dest(service);
        let Some(view) = view::service_view(catalog, service, with_instances) else {
            return Ok(match sync::remove_file(&dest)? {
                true => ServiceOutcome::Removed(dest),
                false => ServiceOutcome::Absent,
            });
        };
        let context = Context {
            globals,
            key: "service",
            value: view,
        };
        Ok(match self.render_file(resource, &context, &dest)? {
            Outcome::Written => ServiceOutcome::Written(dest),
            Outcome::Unchanged => ServiceOutcome::Unchanged,
        })
    }

    /// Renders `resource`'s template with `context` and syncs it to `dest`.
    fn render_file<T: serde::Serialize>(
        &self,
        resource: &Resource,
        context: &Context<'_, T>,
        dest: &Path,
    ) -> Result<Outcome, RenderError> {
        let text = tera::Context::from_serialize(context)
            .and_then(|context| self.tera.render(&resource.def.src, &context))
            .map_err(|err| RenderError::Template {
                src: resource.def.src.clone(),
                dest: dest.to_path_buf(),
                reason: error_chain(&err),
            })?;
        sync::sync_file(dest, text.as_bytes(), &resource.spec)
    }

    /// Service names that have a file of this per-service resource on disk.
    fn existing_service_files(&self, resource: &Resource) -> Vec<String> {
        let (dir, before, after) = resource.split_dest();
        let Ok(listing) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        listing
            .filter_map(|item| item.ok())
            .filter_map(|item| {
                let name = item.file_name().to_string_lossy().into_owned();
                let service = name.strip_prefix(&before)?.strip_suffix(&after)?.to_string();
                crate::catalog::check_service_name(&service)
                    .ok()
                    .map(|()| service)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let mut catalog = Catalog::default();
        catalog.put("services/pg", b"port: 5432", 1);
        catalog.put("addresses/pg", b"127.100.0.7", 1);
        catalog.put("instances/pg/a", b"{host: 10.0.0.1, port: 5432}", 1);
        catalog
    }

    fn renderer(state: &Path, extra: &str) -> Renderer {
        let text = format!("state_dir: {}\n{extra}", state.display());
        let config: AgentConfig = crate::yaml::from_str(&text).unwrap();
        Renderer::new(&config, Ipv4Addr::new(127, 0, 0, 153)).unwrap()
    }

    #[test]
    fn renders_routes_and_zone_then_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let mut renderer = renderer(dir.path(), "");
        let mut catalog = catalog();
        let report = renderer.render(&catalog, &Dirty::everything());
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert_eq!(report.written.len(), 2);
        let route = crate::routing::load_route(&dir.path().join("routes/pg.json")).unwrap();
        assert_eq!(route.backends.len(), 1);

        // An instance change rewrites the route only; the zone is not even rendered.
        let mut dirty = Dirty::default();
        dirty.touch(catalog.put("instances/pg/b", b"{host: 10.0.0.2, port: 5432}", 2));
        let report = renderer.render(&catalog, &dirty);
        assert_eq!(report.written, vec![dir.path().join("routes/pg.json")]);
        assert_eq!(report.unchanged, 0);

        let mut dirty = Dirty::default();
        dirty.touch(catalog.delete("services/pg"));
        let report = renderer.render(&catalog, &dirty);
        assert_eq!(report.removed, vec![dir.path().join("routes/pg.json")]);
        assert_eq!(report.written, vec![dir.path().join(ZONE_FILE)]);
    }

    #[test]
    fn full_render_removes_files_of_services_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("routes")).unwrap();
        std::fs::write(dir.path().join("routes/stale.json"), "old").unwrap();
        let mut renderer = renderer(dir.path(), "");
        let report = renderer.render(&catalog(), &Dirty::everything());
        assert!(report.removed.contains(&dir.path().join("routes/stale.json")));
        assert!(dir.path().join("routes/pg.json").exists());
    }

    #[test]
    fn a_failing_template_keeps_the_old_file_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("templates");
        std::fs::create_dir_all(&templates).unwrap();
        std::fs::write(
            templates.join("bad.tera"),
            "{{ services | first | get(key=\"nope\") }}",
        )
        .unwrap();
        std::fs::write(dir.path().join("bad.out"), "old").unwrap();
        let extra = format!(
            "templates_dir: {}\ntemplates: [{{src: bad.tera, dest: bad.out}}]\n",
            templates.display()
        );
        let mut renderer = renderer(dir.path(), &extra);
        let report = renderer.render(&catalog(), &Dirty::everything());
        assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
        let message = report.failures[0].to_string();
        assert!(
            message.contains("bad.tera") && message.contains("kept the previous file"),
            "{message}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("bad.out")).unwrap(),
            "old"
        );
        assert!(!report.retry.is_empty());
        assert!(dir.path().join("routes/pg.json").exists());
    }

    #[test]
    fn unknown_template_and_owner_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        for (resource, needle) in [
            ("{src: nope.tera, dest: x}", "nope.tera"),
            (
                "{src: env.tera, dest: x, owner: no-such-user-lm}",
                "no-such-user-lm",
            ),
        ] {
            let text = format!("state_dir: {}\ntemplates: [{resource}]\n", dir.path().display());
            let config: AgentConfig = crate::yaml::from_str(&text).unwrap();
            let err = Renderer::new(&config, Ipv4Addr::LOCALHOST)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
