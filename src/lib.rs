//! loopmesh: SmartStack reborn in Rust — a per-node service mesh.
//!
//! Every node runs the agent: it syncs the catalog from etcd (or a directory
//! of YAML files), renders confd-style tera templates into a routing table
//! and a DNS zone, and (in later parts) serves them from an in-process proxy
//! and DNS server. See `DESIGN.md` in the shared docs for the contract.
//!
//! Modules, in data-flow order:
//! - [`config`]: strict YAML agent config, flags on top ([`yaml`] and
//!   [`duration`] are its parsing helpers).
//! - [`store`]: the catalog source, etcd or files: snapshot, then a watch
//!   from the next revision, resync after compaction.
//! - [`catalog`]: typed services, instances and addresses; bad values are
//!   refused per key, the last good value kept.
//! - [`addresses`]: the loopback address pool and stable first picks.
//! - [`render`]: tera templates, template resources, atomic file sync.
//! - [`routing`]: the rendered routing table's format and validation.
//! - [`proxy`]: the L4/L7 proxy: a listener per service, hot-swapped
//!   backends, balancing, outlier ejection, drain; HTTP routes and retries;
//!   mTLS between nodes (tunnels out, an inbound listener).
//! - [`limits`]: the file-descriptor budget per purpose (admin, proxy).
//! - [`state`]: the last-known-good record.
//! - [`agent`]: the control loop tying store, catalog and render together.
//! - [`ca`]: `loopmesh ca`, a small CA making the node certificates of
//!   mTLS between nodes for fleets without one.
//! - [`cli`]: the `loopmesh` command line; [`ops`] its verbs on etcd and
//!   on an agent's admin API; [`manual`] its man pages and shell
//!   completions, [`version`] what `--version` says.
//! - [`admin`]: the admin API, with the [`status_page`], and
//!   [`telemetry`], the metrics it exports (one table of every metric,
//!   HELP included); [`logging`]: stderr or the journal, the filter
//!   changed at run time.

pub mod addresses;
pub mod admin;
pub mod agent;
pub mod agent_status;
pub mod ca;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod dns;
pub mod duration;
pub mod http;
pub mod limits;
pub mod logging;
pub mod manual;
pub mod memory;
pub mod names;
pub mod ops;
pub mod policy;
pub mod proxy;
pub mod registrar;
pub mod render;
pub mod routing;
pub mod signal;
pub mod state;
pub mod status_page;
pub mod store;
pub mod succession;
pub mod systemd;
pub mod takeover;
pub mod telemetry;
pub mod version;
pub mod yaml;
