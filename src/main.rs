//! The `volley` command line: parses options and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use volley::collector::StorageError;
use volley::config::Config;
use volley::demo::{DemoOptions, demo};
use volley::generator::{GenOptions, generate};
use volley::outcome::Outcome;
use volley::send::{Progress, SendOptions, send};
use volley::sink::{Sink, SinkOptions};

/// jemalloc, giving freed memory back to the system on a thread of its own
/// within about a second: glibc's arenas keep what a burst of transactions
/// took (a shard's queue drained into waiting recipients stays resident).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (read at its start).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Registers the process for private expedited membarrier(2) while it has
/// one thread. glommio's executors issue that barrier before they sleep and
/// register on first use; registered then, with jemalloc's and volley's own
/// threads running, the kernel waits for an RCU grace period (10-20 ms in
/// which the first shard sits idle before its first connection, on every
/// run). Registered here, before `main` and before any thread exists, it costs
/// a system call, and glommio's own registration finds it done. A kernel
/// without the command leaves glommio to choose its fallback, as before.
#[used]
#[unsafe(link_section = ".init_array")]
static REGISTER_MEMBARRIER: extern "C" fn() = {
    extern "C" fn register() {
        const QUERY: libc::c_int = 0;
        const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        const REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;
        // Safety: membarrier(2) takes two integers and touches no memory of ours.
        unsafe {
            let supported = libc::syscall(libc::SYS_membarrier, QUERY, 0);
            if supported > 0 && supported & PRIVATE_EXPEDITED != 0 {
                libc::syscall(libc::SYS_membarrier, REGISTER_PRIVATE_EXPEDITED, 0);
            }
        }
    }
    register
};

/// Exit status of `send` when some recipients expired (still deferred at max_age).
const EXIT_EXPIRED: u8 = 3;
/// Exit status of `send` stopped by SIGINT/SIGTERM before every recipient was final.
const EXIT_INTERRUPTED: u8 = 4;
/// Exit status when a mapped file was truncated under volley (SIGBUS).
const EXIT_FILE_CHANGED: i32 = 75;
/// Exit status when a file volley must write (delivery log, journal, spool
/// directory) could not be written: a full disk, an I/O error, a read-only
/// filesystem (EX_IOERR).
const EXIT_STORAGE: u8 = 74;

/// A spool or message file truncated while it is mapped makes the next read
/// of a lost page raise SIGBUS. That cannot be recovered from, but it can be
/// said clearly: the handler writes why and ends the process (the journal
/// holds every committed outcome, so a rerun resumes).
fn explain_sigbus() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"volley: a spool or message file was truncated while volley had it mapped (SIGBUS). \
Files must not change once visible (write NAME.tmp, then rename). Progress is in the journal; fix the file and run again.\n";
        // Only async-signal-safe calls here.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(EXIT_FILE_CHANGED);
        }
    }
    // Safety: the handler only calls write(2) and _exit(2).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

#[derive(Parser)]
#[command(
    name = "volley",
    version,
    about = "Bulk outbound SMTP sender: thread-per-core, pipelined, persistent connections"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: text (plain when stderr is not a terminal) or
    /// json (one object a line). RUST_LOG sets the level (default: info
    /// for `run`, warn otherwise).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ResendOutcome {
    Bounced,
    Expired,
    Rejected,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr: `run` says what it takes and finishes (info) unless
/// RUST_LOG says otherwise; colour only on a terminal.
fn init_logging(format: LogFormat, service: bool) {
    use std::io::IsTerminal;
    let default = if service { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Deliver spool files, retrying deferrals until every recipient is final.
    Send(SendArgs),
    /// The service: deliver the spool files dropped into spool_dir/incoming/ until stopped.
    Run(RunArgs),
    /// An SMTP sink server for load tests.
    Sink(SinkArgs),
    /// Write a spool file and its message file for tests.
    Gen(GenArgs),
    /// Sink + generated spool + send on loopback: 100,000 recipients, no set-up.
    Demo(DemoArgs),
    /// A delay-line TCP proxy: puts a server at a chosen round-trip time on loopback.
    Proxy(ProxyArgs),
    /// Print the DNS TXT record that publishes a DKIM key's public half.
    DkimRecord(DkimRecordArgs),
    /// Split spool files into one set per node of a fleet (no recipient in two).
    Split(SplitArgs),
}

/// Writes OUT/node-0/ … OUT/node-(N-1)/, each with a spool file of each name
/// given (only the recipients of that node) and the message files its jobs
/// use. A recipient goes to its domain's node (a hash of "node:" and the
/// domain); a domain with at least 1/(2 × N) of all the recipients, or named
/// with --spread-domain, goes by recipient over every node. Lines that are
/// not valid jobs go to node 0 unchanged (its sender rejects them) and are
/// listed here.
#[derive(Args)]
struct SplitArgs {
    /// Nodes in the fleet.
    #[arg(long)]
    nodes: usize,
    /// Folder to write node-0/, node-1/, … into.
    #[arg(long)]
    out: PathBuf,
    /// A domain to spread over every node by recipient whatever its share (repeatable).
    #[arg(long = "spread-domain")]
    spread_domains: Vec<String>,
    /// Spool files (names must differ).
    #[arg(required = true)]
    spools: Vec<PathBuf>,
}

#[derive(Args)]
struct DkimRecordArgs {
    /// The private key (PEM: PKCS#1 or PKCS#8, RSA or Ed25519), as `[dkim]` names it.
    #[arg(long)]
    key_file: PathBuf,
    /// The selector (`s=`).
    #[arg(long)]
    selector: String,
    /// The signing domain (`d=`).
    #[arg(long)]
    domain: String,
}

#[derive(Args)]
struct ProxyArgs {
    /// Where clients connect.
    #[arg(long)]
    listen: SocketAddr,
    /// The server to forward to.
    #[arg(long)]
    to: SocketAddr,
    /// Round-trip time to add, in milliseconds (each direction delays by half).
    #[arg(long)]
    rtt_ms: u64,
}

#[derive(Args)]
#[command(after_help = "Exit status: 0 every recipient ended delivered, bounced or rejected; \
3 some expired; 4 stopped by a signal (run it again to finish); 74 a file volley must write \
could not be written; 75 a mapped file was truncated under volley; 1 an error (unreadable \
spool, bad configuration, internal failure); 2 a usage error.")]
struct SendArgs {
    /// Spool files (JSON Lines, spool v1 or v2). Each gets a journal beside
    /// it (SPOOL.journal) that makes a rerun skip what is already final.
    #[arg(required = true)]
    spools: Vec<PathBuf>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// DOMAIN=HOST:PORT (repeatable; `*` matches every domain).
    #[arg(long = "route", value_name = "DOMAIN=HOST:PORT")]
    routes: Vec<String>,
    /// Nameserver for MX lookups as IP:PORT (repeatable; default: those of /etc/resolv.conf).
    #[arg(long = "dns", value_name = "IP:PORT")]
    dns: Vec<std::net::SocketAddr>,
    /// Executors, one per core (default: the cores available).
    #[arg(long)]
    shards: Option<usize>,
    /// Delivery log (JSON Lines, appended to).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Connections per destination for the whole process (max_connections_per_destination; default 20).
    #[arg(long)]
    connections: Option<usize>,
    /// Recipients of one domain in one transaction (default 100).
    #[arg(long)]
    max_rcpts_per_txn: Option<usize>,
    /// Transactions on one connection before it says QUIT and a new one opens (default 1000).
    #[arg(long)]
    max_messages_per_connection: Option<usize>,
    /// QUIT a connection idle this long (default 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Give up on a recipient still deferred this long after it was first seen (default 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// First retry delay of a deferred recipient (default 1s; doubles each time, at most 5m apart).
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_initial: Option<Duration>,
    /// Name to send in EHLO/HELO (default: this host's name).
    #[arg(long)]
    ehlo_name: Option<String>,
    /// TLS policy for every domain: disabled, opportunistic (default), required or verify.
    #[arg(long)]
    tls: Option<volley::tls::TlsPolicy>,
    /// Extra trust roots (PEM) for the verify policy, beside the system store.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// No progress bar or progress lines.
    #[arg(long)]
    quiet: bool,
    /// Keep no journal beside the spool files (a killed or stopped send then starts over).
    #[arg(long)]
    no_journal: bool,
    /// Send again the recipients an earlier run of these files finished
    /// as OUTCOME (from their journals; comma-separated or repeated), e.g.
    /// after a DNS outage bounced them. Their max_age runs anew.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "OUTCOME")]
    resend: Vec<ResendOutcome>,
    /// Do not fdatasync the journal (for benchmarks: a crash may then lose progress).
    #[arg(long)]
    no_fsync: bool,
    /// Serve /metrics (Prometheus) and /status (JSON) on IP:PORT while sending.
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<String>,
    /// Never pipeline: every command waits for its reply (lock-step).
    #[arg(long)]
    no_pipelining: bool,
    /// Never use BDAT (CHUNKING): DATA only.
    #[arg(long)]
    no_chunking: bool,
    /// With BDAT: transactions in flight on one connection to start with (default 8).
    #[arg(long)]
    pipeline_window: Option<usize>,
    /// With BDAT: what that window may grow to while the server takes every
    /// transaction (default 64; the start value: no growth).
    #[arg(long)]
    pipeline_window_max: Option<usize>,
}

#[derive(Args)]
#[command(
    after_help = "Spool layout under spool_dir: producers write incoming/NAME.jsonl.tmp, \
then rename it to incoming/NAME.jsonl (message files beside it); volley takes it into active/ \
with its journal and moves it to done/ with NAME.jsonl.summary.json once every recipient is \
final (failed/ with NAME.jsonl.reason if it cannot be read).\n\n\
Signals: SIGTERM or SIGINT stops gracefully (in-flight transactions finish within \
shutdown_timeout, journals flushed, exit 0; a restart resumes active/ from its journals); \
a second signal ends the process at once."
)]
struct RunArgs {
    /// TOML configuration file; `spool_dir` is required.
    #[arg(long)]
    config: PathBuf,
    /// Serve /metrics and /status on IP:PORT (default: `metrics_listen`, else 127.0.0.1:9464; "" for none).
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<String>,
}

#[derive(Args)]
struct SinkArgs {
    /// Address and port to listen on (every executor on it, SO_REUSEPORT).
    #[arg(long, default_value = "127.0.0.1:2525")]
    listen: SocketAddr,
    /// Executors, one per core (default: the cores available).
    #[arg(long)]
    shards: Option<usize>,
    /// Probability that a RCPT is answered 450.
    #[arg(long, default_value_t = 0.0)]
    defer_rate: f64,
    /// Probability that a RCPT is answered 550.
    #[arg(long, default_value_t = 0.0)]
    reject_rate: f64,
    /// Probability that a MAIL makes the sink close the connection without answering it.
    #[arg(long, default_value_t = 0.0)]
    disconnect_rate: f64,
    /// Delay before each batch of replies, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Exit after this many messages.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Sessions at once; beyond, a new one is greeted with 421 and closed.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Messages per client address, as a provider throttles (e.g. 500/s, 20000/h):
    /// over it, MAIL gets --throttle-reply.
    #[arg(long)]
    rate_limit: Option<volley::shaping::Rate>,
    /// The reply to MAIL over --rate-limit (a 421 also closes the session).
    #[arg(long, default_value = volley::sink::THROTTLE_REPLY)]
    throttle_reply: String,
    /// Messages per session; the next MAIL gets 421 and the session closes.
    #[arg(long)]
    max_messages_per_connection: Option<u64>,
    /// Write each message received into this folder.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Print the counts every second.
    #[arg(long)]
    stats: bool,
    /// Seed of the fault injection.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Name in the greeting and EHLO reply (and of the self-signed certificate).
    #[arg(long, default_value = "sink.volley.test")]
    hostname: String,
    /// Offer STARTTLS (with a self-signed certificate unless --cert/--key are given).
    #[arg(long)]
    tls: bool,
    /// Certificate chain (PEM) for --tls.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) for --tls.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Offer STARTTLS, answer 220, then close instead of the handshake.
    #[arg(long)]
    tls_fault: bool,
    /// TLS from the first byte, as on port 465 (implies --tls).
    #[arg(long)]
    implicit_tls: bool,
    /// Offer CHUNKING (RFC 3030): take BDAT as well as DATA.
    #[arg(long)]
    chunking: bool,
    /// Offer SMTPUTF8 (RFC 6531): take UTF-8 addresses on a MAIL that asks for it.
    #[arg(long)]
    smtputf8: bool,
    /// Do not offer 8BITMIME (RFC 6152): refuse messages with 8-bit content.
    #[arg(long = "no-8bitmime")]
    no_8bitmime: bool,
    /// Require AUTH PLAIN or LOGIN with USER:PASSWORD before MAIL.
    #[arg(long, value_name = "USER:PASSWORD")]
    auth: Option<String>,
}

#[derive(Args)]
struct GenArgs {
    /// Spool file to write; the message file goes beside it with the extension .eml.
    #[arg(long)]
    out: PathBuf,
    /// Spool lines (jobs) to write, all sharing one message file.
    #[arg(long, default_value_t = 1000)]
    jobs: u64,
    /// Recipient domains, named d0.test, d1.test, …
    #[arg(long, default_value_t = 100)]
    domains: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 1500)]
    size: usize,
    /// Recipients in each job's `to` (each job's spread over the domains in turn).
    #[arg(long, default_value_t = 1)]
    rcpts_per_job: u64,
    /// Envelope sender of every job.
    #[arg(long, default_value = "bounces@gen.volley.test")]
    from: String,
    /// Spool v2: a templated message and per-recipient variables (each recipient its own copy).
    #[arg(long)]
    personalised: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Executors for the sender and for the sink (default: the cores available).
    #[arg(long)]
    shards: Option<usize>,
    #[arg(long, default_value_t = 100_000)]
    recipients: u64,
    #[arg(long, default_value_t = 1_000)]
    domains: u64,
}

/// Raises the soft limit on open files to the hard one: a sender holds a
/// socket per connection and per DNS query in flight, and distributions
/// start processes at 1,024 while allowing far more.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn cmd_split(a: SplitArgs) -> anyhow::Result<ExitCode> {
    let r = volley::split::split(&volley::split::SplitOptions {
        nodes: a.nodes,
        out: a.out.clone(),
        spools: a.spools,
        spread_domains: a.spread_domains,
    })?;
    for b in &r.bad_lines {
        eprintln!("volley: {b} (given to node 0 as it is; its sender rejects it)");
    }
    for (k, n) in r.nodes.iter().enumerate() {
        println!(
            "{}: {} lines, {} recipients, {} message files",
            volley::split::node_dir(&a.out, k).display(),
            n.lines,
            n.recipients,
            n.messages
        );
    }
    if !r.spread.is_empty() {
        let list: Vec<String> = r.spread.iter().take(10).map(|(d, n)| format!("{d} ({n})")).collect();
        println!("spread over every node by recipient: {}", list.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    raise_open_files_limit();
    let cli = Cli::parse();
    init_logging(cli.log_format, matches!(cli.command, Command::Run(_)));
    let executors = matches!(
        cli.command,
        Command::Send(_) | Command::Run(_) | Command::Sink(_) | Command::Demo(_)
    );
    if executors && let Err(e) = volley::runtime::ensure_memlock() {
        eprintln!("volley: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Send(a) => cmd_send(a),
        Command::Run(a) => cmd_run(a),
        Command::Sink(a) => cmd_sink(a),
        Command::Gen(a) => generate(&GenOptions {
            out: a.out.clone(),
            jobs: a.jobs,
            domains: a.domains,
            size: a.size,
            rcpts_per_job: a.rcpts_per_job,
            from: a.from,
            personalised: a.personalised,
        })
        .map(|()| {
            println!(
                "wrote {} ({} jobs, {} recipients over {} domains) and its message file {}",
                a.out.display(),
                a.jobs,
                a.jobs * a.rcpts_per_job,
                a.domains,
                volley::generator::message_file_for(&a.out).display()
            );
            ExitCode::SUCCESS
        }),
        Command::Demo(a) => cmd_demo(a),
        Command::Proxy(a) => cmd_proxy(a),
        Command::Split(a) => cmd_split(a),
        Command::DkimRecord(a) => volley::dkim::dns_record(&a.key_file, &a.selector, &a.domain).map(|r| {
            println!("{r}");
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("volley: {e:#}");
            if e.chain().any(|c| c.is::<StorageError>()) {
                ExitCode::from(EXIT_STORAGE)
            } else if e.chain().any(|c| c.is::<volley::config::UsageError>()) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn cmd_send(a: SendArgs) -> anyhow::Result<ExitCode> {
    explain_sigbus();
    let mut config = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    for r in &a.routes {
        config.add_route(r)?;
    }
    if !a.dns.is_empty() {
        config.dns.servers = a.dns;
    }
    config.shards = a.shards.or(config.shards);
    config.log = a.log.or(config.log);
    config.ehlo_name = a.ehlo_name.or(config.ehlo_name);
    config.ca_file = a.ca_file.or(config.ca_file);
    if let Some(t) = a.tls {
        config.tls = t;
    }
    if !a.resend.is_empty() && a.no_journal {
        return Err(volley::config::UsageError(
            "--resend reads the journals of earlier runs: it cannot go with --no-journal".into(),
        )
        .into());
    }
    config.resend = a
        .resend
        .iter()
        .map(|o| match o {
            ResendOutcome::Bounced => Outcome::Bounced,
            ResendOutcome::Expired => Outcome::Expired,
            ResendOutcome::Rejected => Outcome::Rejected,
        })
        .collect();
    if a.no_journal {
        config.journal = false;
    }
    if a.no_fsync {
        config.journal_fsync = false;
    }
    if a.metrics.is_some() {
        config.metrics_listen = a.metrics;
    }
    if a.no_pipelining {
        config.pipelining = false;
    }
    if a.no_chunking {
        config.chunking = false;
    }
    if let Some(n) = a.pipeline_window {
        config.pipeline_window = n;
    }
    if let Some(n) = a.pipeline_window_max {
        config.pipeline_window_max = Some(n);
    }
    if let Some(n) = a.connections {
        config.max_connections_per_destination = n;
    }
    if let Some(n) = a.max_rcpts_per_txn {
        config.max_rcpts_per_txn = n;
    }
    if let Some(n) = a.max_messages_per_connection {
        config.max_messages_per_connection = n;
    }
    if let Some(d) = a.idle_timeout {
        config.idle_timeout = d;
    }
    if let Some(d) = a.max_age {
        config.retry.max_age = d;
    }
    if let Some(d) = a.retry_initial {
        config.retry.initial = d;
    }
    // The first SIGINT/SIGTERM stops gracefully; a second one ends the process at once.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_INTERRUPTED.into(), stop.clone())
            .context("cannot install a signal handler")?;
        signal_hook::flag::register(sig, stop.clone()).context("cannot install a signal handler")?;
    }
    let summary = send(SendOptions {
        spools: a.spools,
        config,
        progress: if a.quiet { Progress::Off } else { Progress::Auto },
        stop: Some(stop),
        watch: None,
    })?;
    print!("{}", summary.render());
    Ok(if summary.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if summary.count(Outcome::Expired) > 0 {
        ExitCode::from(EXIT_EXPIRED)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_run(a: RunArgs) -> anyhow::Result<ExitCode> {
    explain_sigbus();
    let mut config = Config::load_for_run(&a.config)?;
    if a.metrics.is_some() {
        config.metrics_listen = a.metrics;
    }
    let Some(root) = config.spool_dir.clone() else {
        anyhow::bail!("{}: `spool_dir` is required for volley run", a.config.display());
    };
    let dir = volley::service::SpoolDir::create(&root)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, EXIT_INTERRUPTED.into(), stop.clone())
            .context("cannot install a signal handler")?;
        signal_hook::flag::register(sig, stop.clone()).context("cannot install a signal handler")?;
    }
    eprintln!("volley run: watching {}", dir.incoming.display());
    let summary = send(SendOptions {
        spools: Vec::new(),
        config,
        progress: Progress::Off,
        stop: Some(stop),
        watch: Some(dir),
    })?;
    println!(
        "volley run stopped after {:.0}s: {} delivered, {} bounced, {} expired, {} rejected, {} deferrals",
        summary.duration.as_secs_f64(),
        summary.count(Outcome::Delivered),
        summary.count(Outcome::Bounced),
        summary.count(Outcome::Expired),
        summary.count(Outcome::Rejected),
        summary.count(Outcome::Deferred)
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_sink(a: SinkArgs) -> anyhow::Result<ExitCode> {
    for (name, p) in [
        ("--defer-rate", a.defer_rate),
        ("--reject-rate", a.reject_rate),
        ("--disconnect-rate", a.disconnect_rate),
    ] {
        anyhow::ensure!((0.0..=1.0).contains(&p), "{name} must be between 0 and 1, got {p}");
    }
    let reply_code = a.throttle_reply.get(..3).and_then(|c| c.parse::<u16>().ok());
    anyhow::ensure!(
        reply_code.is_some_and(|c| (400..600).contains(&c)) && a.throttle_reply.as_bytes().get(3) == Some(&b' '),
        "--throttle-reply must start with a 4xx or 5xx code and a space, got {:?}",
        a.throttle_reply
    );
    let shards = a.shards.unwrap_or_else(|| Config::default().shards());
    let auth = match &a.auth {
        Some(s) => {
            let (u, p) = s.split_once(':').context("--auth needs USER:PASSWORD")?;
            Some((u.to_string(), p.to_string()))
        }
        None => None,
    };
    let tls = if a.tls || a.cert.is_some() || a.implicit_tls {
        let pair = a.cert.as_deref().zip(a.key.as_deref());
        Some(volley::tls::server_config(pair, &a.hostname)?)
    } else {
        None
    };
    let sink = Sink::start(SinkOptions {
        listen: a.listen,
        shards,
        hostname: a.hostname,
        defer_rate: a.defer_rate,
        reject_rate: a.reject_rate,
        disconnect_rate: a.disconnect_rate,
        latency: Duration::from_millis(a.latency_ms),
        dump: a.dump,
        seed: a.seed,
        tls,
        tls_fault: a.tls_fault,
        implicit_tls: a.implicit_tls,
        auth,
        chunking: a.chunking,
        smtputf8: a.smtputf8,
        no_8bitmime: a.no_8bitmime,
        max_connections: a.max_connections,
        rate_limit: a.rate_limit,
        throttle_reply: a.throttle_reply,
        max_messages_per_connection: a.max_messages_per_connection,
    })?;
    eprintln!("volley sink listening on {} ({shards} shards)", sink.addr());
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install a signal handler")?;
    }
    let mut last_print = Instant::now();
    while !stop.load(Ordering::Relaxed) && a.max_messages.is_none_or(|max| sink.counts().messages < max) {
        std::thread::sleep(Duration::from_millis(20));
        if a.stats && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!("{}", sink.counts());
        }
    }
    println!("{}", sink.stop());
    Ok(ExitCode::SUCCESS)
}

fn cmd_proxy(a: ProxyArgs) -> anyhow::Result<ExitCode> {
    use volley::proxy::{Proxy, ProxyOptions};
    let proxy = Proxy::start(ProxyOptions {
        listen: a.listen,
        to: a.to,
        rtt: Duration::from_millis(a.rtt_ms),
    })?;
    eprintln!(
        "volley proxy listening on {} → {} (+{} ms round trip)",
        proxy.addr(),
        a.to,
        a.rtt_ms
    );
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install a signal handler")?;
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = proxy.stats();
    println!(
        "connections {} bytes {}",
        s.connections.load(Ordering::Relaxed),
        s.bytes.load(Ordering::Relaxed)
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let r = demo(DemoOptions {
        recipients: a.recipients,
        domains: a.domains,
        shards: a.shards,
        progress: Progress::Auto,
    })?;
    print!("{}", r.summary.render());
    println!("sink: {}", r.sink);
    if r.ok() {
        println!(
            "demo ok: all {} recipients delivered and counted by the sink",
            r.expected
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "demo FAILED: expected {} delivered, volley says {}, the sink counted {}",
            r.expected,
            r.summary.count(Outcome::Delivered),
            r.sink.recipients
        );
        Ok(ExitCode::FAILURE)
    }
}
