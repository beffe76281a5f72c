//! Command line: `loopmesh agent | check | render --once | registrar | set-state | ca`.
//!
//! Flag names follow the contract in DESIGN.md; they override the config
//! file. Errors reach the operator as one line and a non-zero exit status
//! that says what kind of failure it was ([`exit_code`]).

use crate::agent::{self, Pipeline};
use crate::config::{AgentConfig, Overrides};
use crate::ops::endpoints::{self, EndpointsError};
use crate::ops::output::{self, Output};
use crate::ops::{Ops, OpsError};
use crate::registrar::config::{parse_state, RegistrarConfig};
use crate::registrar::Registrar;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// A per-node service mesh: etcd catalog, rendered routes, loopback DNS and proxy.
#[derive(Debug, Parser)]
#[command(name = "loopmesh", version = crate::version::VERSION, about)]
#[command(after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the catalog and keep the rendered files up to date.
    Agent(AgentRun),
    /// Load and validate the config, templates and template resources, then exit.
    Check(AgentArgs),
    /// Render once from the current catalog and exit (confd's -onetime).
    Render {
        /// Required: render a single time and exit.
        #[arg(long, required = true)]
        once: bool,
        #[command(flatten)]
        args: AgentArgs,
    },
    /// Health-check this node's backends and keep the healthy ones registered.
    Registrar(RegistrarArgs),
    /// Service definitions in etcd: put, get, list, delete (validated before writing).
    Service {
        #[command(subcommand)]
        verb: ServiceVerb,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Instances in etcd: list them with their state, or set one's state.
    Instance {
        #[command(subcommand)]
        verb: InstanceVerb,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Restart the agent running on this state directory without refusing a
    /// connection: it starts the binary on disk with the config on disk
    /// (`--takeover`), which takes its sockets over; waits until that one
    /// serves (systemd's ExecReload).
    Reload {
        /// The agent's config file (names the state directory).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The agent's state directory (instead of --config).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// How long to wait for the new agent to serve.
        #[arg(long, value_name = "DURATION", default_value = "150s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show a node's routes (from its agent's admin API).
    Routes {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// A node's readiness, then each backend with its state and traffic
    /// (from its agent's admin API; the same as its status page).
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Put one of this node's instances in maintenance or draining (or back up):
    /// writes the registrar's flag file, which the running registrar follows.
    SetState {
        /// Registrar config file (names the flags directory).
        #[arg(long, value_name = "FILE", default_value = "/etc/loopmesh/registrar.yaml")]
        config: PathBuf,
        /// Node name, as given to the registrar with --node (default: the
        /// config's `node`, else the hostname); default ids are `<node>-<port>`.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Instance id (as registered: `<node>-<port>` unless configured).
        instance: String,
        /// up, draining or maintenance.
        state: String,
    },
    /// A small CA for mTLS between nodes, for fleets without one: make it,
    /// then issue each node its certificate.
    Ca {
        #[command(subcommand)]
        verb: CaVerb,
    },
    /// Print the shell completion script for bash, zsh or fish (the Debian
    /// package installs them).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages, loopmesh(1) and one per subcommand, into a
    /// directory (used to build the package).
    #[command(hide = true)]
    Man {
        /// The directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaVerb {
    /// Make a CA: ca.pem (the trust bundle), ca.key (mode 0600) and trust-domain in a new directory.
    Init {
        /// The mesh's trust domain: node identities are spiffe://<D>/node/<node>.
        #[arg(long, value_name = "D")]
        trust_domain: String,
        /// The CA's directory (created with mode 0700).
        #[arg(long, value_name = "DIR", default_value = crate::ca::DEFAULT_CA_DIR)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = crate::ca::DEFAULT_CA_DAYS, value_parser = days)]
        days: u32,
        /// Overwrite an existing CA's files (a new CA: what the old one issued stops verifying).
        #[arg(long)]
        force: bool,
    },
    /// Issue a node's certificate: <node>.pem (certificate and CA), <node>.key (mode 0600), bundle.pem.
    Issue {
        /// The node's name, as the agent's `node` (default there: the hostname).
        #[arg(long, value_name = "NAME")]
        node: String,
        /// The CA's directory, as `loopmesh ca init` made it.
        #[arg(long = "ca", value_name = "DIR", default_value = crate::ca::DEFAULT_CA_DIR)]
        ca_dir: PathBuf,
        /// Where to write the files.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = crate::ca::DEFAULT_NODE_DAYS, value_parser = days)]
        days: u32,
        /// Overwrite the node's existing certificate, key and bundle.
        #[arg(long)]
        force: bool,
    },
}

fn days(text: &str) -> Result<u32, String> {
    let max = crate::ca::MAX_DAYS;
    match text.parse::<u32>() {
        Ok(days) if (1..=max).contains(&days) => Ok(days),
        _ => Err(format!("{text:?} is not a number of days from 1 to {max}")),
    }
}

/// The exit statuses, in `--help` and the man page.
const EXIT_STATUS: &str = "Exit status:
  0  success
  1  failure: input or a config refused, or a command that failed
  2  usage: an unknown flag or argument, or no etcd endpoints given
  3  not found: the service, instance or key does not exist
  4  unavailable: etcd or the agent's admin API could not be reached or
     refused the request (connection, TLS, credentials, timeout)";

/// Success (0).
pub const EXIT_OK: u8 = 0;
/// A failure of any other kind (1).
pub const EXIT_FAILURE: u8 = 1;
/// Usage (2): clap's own status for a bad command line, and no endpoints.
pub const EXIT_USAGE: u8 = 2;
/// Not found (3).
pub const EXIT_NOT_FOUND: u8 = 3;
/// Unavailable (4).
pub const EXIT_UNAVAILABLE: u8 = 4;

/// The exit status for an error, by its kind (see [`EXIT_STATUS`]).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(EndpointsError::None) = cause.downcast_ref::<EndpointsError>() {
            return EXIT_USAGE;
        }
        if let Some(err) = cause.downcast_ref::<OpsError>() {
            return match err {
                OpsError::Missing { .. } => EXIT_NOT_FOUND,
                OpsError::Admin { .. } => EXIT_UNAVAILABLE,
                OpsError::Store(crate::store::StoreError::Credentials { .. }) => EXIT_FAILURE,
                OpsError::Store(_) => EXIT_UNAVAILABLE,
                OpsError::Endpoints(EndpointsError::None) => EXIT_USAGE,
                _ => EXIT_FAILURE,
            };
        }
    }
    EXIT_FAILURE
}

/// Where the ops verbs find etcd. Endpoints: --etcd, else LOOPMESH_ETCD,
/// else ETCDCTL_ENDPOINTS, else the --config file's store.etcd.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated [default: $LOOPMESH_ETCD, else
    /// $ETCDCTL_ENDPOINTS, else the --config file's].
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',', global = true)]
    pub etcd: Option<Vec<String>>,
    /// Key prefix [default: the --config file's, else /loopmesh].
    #[arg(long, value_name = "P", global = true)]
    pub prefix: Option<String>,
    /// An agent or registrar config whose store section (etcd endpoints,
    /// TLS, credentials, prefix) to use.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

impl EtcdArgs {
    /// The etcd these flags, the environment and the config name.
    fn ops(self) -> anyhow::Result<Ops> {
        let given = endpoints::Given {
            etcd: self.etcd,
            prefix: self.prefix,
            config: self.config.as_deref(),
        };
        let target = endpoints::resolve(&given, |name| std::env::var(name).ok()).map_err(OpsError::from)?;
        Ok(Ops::new(target)?)
    }
}

/// Where `routes` and `status` find the agent, and how they print.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The agent's admin address.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9901")]
    pub admin: std::net::SocketAddr,
    #[command(flatten)]
    pub output: OutputArg,
}

/// `-o table|json` of the listing verbs.
#[derive(Debug, Args)]
pub struct OutputArg {
    /// table: aligned columns for people; json: one document for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum ServiceVerb {
    /// Write a service definition (YAML or JSON), refused if an agent would refuse it.
    Put {
        name: String,
        /// The definition, e.g. '{port: 5432, balance: least_connections}'.
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the definition from a file instead.
        #[arg(long, value_name = "FILE", conflicts_with = "value")]
        file: Option<PathBuf>,
    },
    /// Print a service definition as stored (-o: its row as in list, or JSON).
    Get {
        name: String,
        /// table: the row of `service list`; json: the row, the stored
        /// value and the definition with its defaults [default: the value as stored].
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<Output>,
    },
    /// List services with port, address and instance count.
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// Delete a service definition (its instances and address stay).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum InstanceVerb {
    /// List instances (of one service, or all) with their state.
    List {
        service: Option<String>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Set an instance's state: up, draining or maintenance. A registrar's
    /// instance (under a lease) is refused: use `loopmesh set-state` on its node.
    SetState {
        service: String,
        id: String,
        state: String,
        /// Write a registrar's instance anyway; its flag wins at its next write.
        #[arg(long)]
        force: bool,
    },
}

/// Flags of the registrar.
#[derive(Debug, Args)]
pub struct RegistrarArgs {
    /// YAML config file.
    #[arg(long, value_name = "FILE", default_value = "/etc/loopmesh/registrar.yaml")]
    pub config: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Admin HTTP address (/metrics, /ready, /instances).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Validate the config and every service file, then exit.
    #[arg(long)]
    pub check: bool,
}

impl RegistrarArgs {
    fn load(&self) -> anyhow::Result<RegistrarConfig> {
        let overrides = Overrides {
            admin_listen: self.admin_listen,
            ..self.store.overrides()
        };
        Ok(RegistrarConfig::load(&self.config, &overrides)?)
    }
}

/// Where the catalog is and who this node is: flags of the agent and the
/// registrar alike.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// etcd endpoints, comma-separated; absent means the file catalog.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// File catalog directory.
    #[arg(long, value_name = "DIR")]
    pub catalog_dir: Option<PathBuf>,
    /// Key prefix (default /loopmesh).
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    /// Node name (default: hostname).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

impl StoreArgs {
    /// The overrides these flags make.
    fn overrides(&self) -> Overrides {
        Overrides {
            etcd: self.etcd.clone(),
            catalog_dir: self.catalog_dir.clone(),
            prefix: self.prefix.clone(),
            node: self.node.clone(),
            ..Overrides::default()
        }
    }
}

/// `loopmesh agent`: the agent's flags, and whether to take over.
#[derive(Debug, Args)]
pub struct AgentRun {
    #[command(flatten)]
    pub args: AgentArgs,
    /// Take the listening sockets over from the agent running on the same
    /// state directory (its control socket there), which then stops
    /// accepting, drains and exits: the zero-refusal restart and upgrade.
    #[arg(long)]
    pub takeover: bool,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(text).map_err(|err| err.to_string())
}

/// Flags shared by the agent's commands.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// YAML config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Rendered files and last-known-good state.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// DNS server address (also the zone's NS glue).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dns_listen: Option<std::net::SocketAddrV4>,
    /// Admin HTTP address (/metrics, /ready...).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Static mode: no catalog; serve the hand-written files in <state-dir>/routes.
    #[arg(long = "static")]
    pub static_mode: bool,
}

impl AgentArgs {
    fn load(&self) -> anyhow::Result<AgentConfig> {
        let overrides = Overrides {
            state_dir: self.state_dir.clone(),
            dns_listen: self.dns_listen,
            admin_listen: self.admin_listen,
            static_mode: self.static_mode,
            ..self.store.overrides()
        };
        Ok(AgentConfig::load(self.config.as_deref(), &overrides)?)
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The daemons' configs may set the level; load them first (again below).
    let level = match &cli.command {
        // A config that does not load is reported below (and to a
        // predecessor waiting on it).
        Command::Agent(run) => run.args.load().ok().and_then(|config| config.log_level),
        Command::Registrar(args) if !args.check => args.load()?.log_level,
        _ => None,
    };
    crate::logging::init(level.as_deref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Agent(run) => {
                let result = run_agent(&run).await;
                if let (Err(err), Some(socket)) = (&result, crate::takeover::predecessor_socket()) {
                    // The agent that started this one waits to hear.
                    crate::takeover::report_failure(&socket, &one_line(err)).await;
                }
                result?;
            }
            Command::Reload {
                config,
                state_dir,
                timeout,
            } => {
                let state_dir = match (state_dir, config) {
                    (Some(dir), _) => dir,
                    (None, config) => AgentConfig::load(config.as_deref(), &Overrides::default())?.state_dir,
                };
                let pid = crate::takeover::request_reload(&state_dir, timeout)
                    .await
                    .context("reload failed; the running agent serves on")?;
                println!("reloaded: pid {pid} serves now");
            }
            Command::Check(args) => {
                let config = args.load()?;
                Pipeline::new(config.clone())?;
                if let Some(note) = agent::catalog_dir_note(&config) {
                    eprintln!("note: {note}");
                }
                println!(
                    "ok: config, {} template resource(s) and templates are valid",
                    config.templates.len() + crate::render::core_resources().len()
                );
            }
            Command::Service { verb, etcd } => {
                let ops = etcd.ops()?;
                let out = match verb {
                    ServiceVerb::Put { name, value, file } => {
                        let value = match (value, file) {
                            (Some(value), _) => value,
                            (None, Some(file)) => std::fs::read_to_string(&file)
                                .with_context(|| format!("cannot read {}", file.display()))?,
                            (None, None) => anyhow::bail!("give the definition or --file"),
                        };
                        format!("put {}\n", ops.put_service(&name, &value).await?)
                    }
                    ServiceVerb::Get { name, output } => {
                        output::service(&ops.get_service(&name).await?, output)
                    }
                    ServiceVerb::List { output } => {
                        output::services(&ops.service_rows().await?, output.output)
                    }
                    ServiceVerb::Delete { name } => format!("deleted {}\n", ops.delete_service(&name).await?),
                };
                print!("{}", ensure_newline(out));
            }
            Command::Instance { verb, etcd } => {
                let ops = etcd.ops()?;
                let out = match verb {
                    InstanceVerb::List { service, output } => {
                        output::instances(&ops.instance_rows(service.as_deref()).await?, output.output)
                    }
                    InstanceVerb::SetState {
                        service,
                        id,
                        state,
                        force,
                    } => {
                        let set = ops.set_instance_state(&service, &id, &state, force).await?;
                        if let Some(warning) = &set.warning {
                            eprintln!("{warning}");
                        }
                        format!("{}: {}", set.key, set.state.as_str())
                    }
                };
                print!("{}", ensure_newline(out));
            }
            Command::Routes { node } => {
                let routes = crate::ops::node::fetch(node.admin, "/routes", false).await?;
                print!("{}", output::routes(&routes, node.output.output));
            }
            Command::Status { node } => {
                let ready = crate::ops::node::fetch(node.admin, "/ready", true).await?;
                let routes = crate::ops::node::fetch(node.admin, "/routes", false).await?;
                print!("{}", output::status(&ready, &routes, node.output.output));
            }
            Command::Registrar(args) if args.check => {
                let backends = args.load()?.backends()?;
                println!("ok: registrar config and {} backend(s) are valid", backends.len());
            }
            Command::Registrar(args) => {
                let config = args.load()?;
                if config.admin.enabled {
                    crate::admin::install_recorder()?;
                }
                Registrar::new(config)?.run(crate::signal::shutdown()).await?;
            }
            Command::SetState {
                config,
                node,
                instance,
                state,
            } => {
                let state = parse_state(&state).map_err(|reason| anyhow::anyhow!("{reason}"))?;
                crate::catalog::check_instance_id(&instance)?;
                let overrides = Overrides {
                    node,
                    ..Overrides::default()
                };
                let loaded = RegistrarConfig::load(&config, &overrides)?;
                let flags = loaded.set_flag(&config, &instance, state)?;
                println!("{instance}: {} (flag in {})", state.as_str(), flags.display());
            }
            Command::Ca { verb } => {
                let outputs = match verb {
                    CaVerb::Init {
                        trust_domain,
                        out,
                        days,
                        force,
                    } => crate::ca::init(&trust_domain, &out, days, force)?,
                    CaVerb::Issue {
                        node,
                        ca_dir,
                        out,
                        days,
                        force,
                    } => crate::ca::issue(&ca_dir, &node, &out, days, force)?,
                };
                for output in outputs {
                    let verb = if output.unchanged { "kept" } else { "wrote" };
                    println!("{verb} {}: {}", output.path.display(), output.what);
                }
            }
            Command::Render { args, .. } => {
                let report = agent::render_once(args.load()?).await?;
                println!(
                    "rendered: {} written, {} removed, {} unchanged",
                    report.written.len(),
                    report.removed.len(),
                    report.unchanged
                );
            }
            Command::Completions { shell } => crate::manual::print_completion(shell)?,
            Command::Man { out } => {
                for page in crate::manual::write_man_pages(&out)? {
                    println!("wrote {}", page.display());
                }
            }
        }
        Ok(())
    })
}

/// `loopmesh agent`, fresh or taking over.
async fn run_agent(run: &AgentRun) -> anyhow::Result<()> {
    let config = run.args.load()?;
    if run.args.config.is_none() {
        tracing::info!(
            "no --config: built-in defaults and flags; {}, state in {}",
            match &config.store.etcd {
                Some(etcd) => format!("etcd {}", etcd.endpoints.join(",")),
                None if config.static_mode => "static mode".to_string(),
                None => format!("file catalog in {}", config.store.catalog_dir.display()),
            },
            config.state_dir.display()
        );
    }
    if config.admin.enabled {
        // Before anything registers a metric, so none is lost.
        crate::admin::install_recorder()?;
    }
    // Signal handlers first: a SIGTERM during start-up is a clean stop,
    // and a SIGHUP then is ignored rather than fatal (once running, it
    // starts a successor).
    let shutdown = crate::signal::shutdown();
    let _hangups_ignored_until_running = crate::signal::Hangups::new();
    let pipeline = (!config.static_mode)
        .then(|| Pipeline::new(config.clone()))
        .transpose()?;
    let handover = match run.takeover {
        true => Some(crate::takeover::take_over(&config.state_dir).await?),
        false => None,
    };
    match pipeline {
        Some(pipeline) => pipeline.run(shutdown, handover).await?,
        None => agent::run_static(config, shutdown, handover).await?,
    }
    Ok(())
}

/// An error and its causes on one line.
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
}

fn ensure_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}
