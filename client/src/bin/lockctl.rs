//! `lockctl`: command-line client for lockd.
//!
//! Errors print one `Error: ...` line to stderr; the exit code is 1 for
//! server-side, network and not-found errors and 2 for usage and parse errors.

#[path = "lockctl/elect.rs"]
mod elect;
#[path = "lockctl/lock.rs"]
mod lock;
#[path = "lockctl/session.rs"]
mod session;
#[path = "lockctl/txn.rs"]
mod txn;

use std::io::Read;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use lockd_client::proto::{self, op, op_result};
use std::time::Duration;

use lockd_client::{Client, ClientOptions, Error};
use serde_json::{json, Value};

const TXN_HELP: &str = r#"Run a transaction read from stdin.

The spec is line based. Compares come first (all must hold), then a `then`
line and the ops run when they hold, then optionally an `else` line and the
ops run otherwise:

  # compares (all must hold), one per line
  if version /config = 3
  if exists /lock
  if !exists /lock              (same as: if exists /lock = false)
  if value /mode = "on"
  if create_revision /a > 10
  if mod_revision /a != 7
  then
  put /config "new value"
  create /x "v"
  del /old
  get /config
  else
  get /config

Compare targets: version, create_revision, mod_revision (numbers), value
(bytes), exists (true/false). Operators: =, !=, <, > (exists: = and != only).
Ops: put PATH VALUE [--parents], create PATH VALUE [--parents],
del PATH [--recursive], get PATH. A VALUE is a bare word or a double-quoted
string with \" and \\ escapes. Blank lines and `#` comments are ignored.

Output: SUCCESS or FAILURE, then one line per op of the branch that ran
(`put PATH OK`, `create PATH OK`, `del PATH N`, `get PATH VALUE`); with
-o json an object {succeeded, revision, results: [...]}.
Parse errors print `Error: txn line N: ...` and exit with status 2."#;

#[derive(Parser, Debug)]
#[command(name = "lockctl", version, about = "Command-line client for lockd")]
struct Cli {
    /// Comma-separated member endpoints (host:port).
    #[arg(
        long,
        global = true,
        env = "LOCKD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001"
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Timeout of one request attempt, in seconds.
    #[arg(long, global = true, default_value_t = 10.0, value_parser = parse_secs)]
    timeout: f64,
    /// How long to keep retrying on other endpoints, in seconds.
    #[arg(long, global = true, default_value_t = 15.0, value_parser = parse_secs)]
    retry_budget: f64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create or overwrite KEY with VALUE.
    Put {
        /// Absolute path, e.g. /config.
        key: String,
        /// Value (taken as UTF-8 bytes).
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// Fail unless the node has exactly this version (0: must not exist).
        #[arg(long)]
        expected_version: Option<u64>,
        /// Create missing parent nodes.
        #[arg(long)]
        parents: bool,
    },
    /// Print the value of KEY.
    Get {
        /// Absolute path.
        key: String,
        /// Read the contacted member's local state (may be stale).
        #[arg(long)]
        serializable: bool,
        /// Answer only from a state that includes this revision (e.g. the
        /// revision a write of yours returned); with --serializable, a
        /// read-your-writes read without a leader round trip.
        #[arg(long, default_value_t = 0)]
        min_revision: u64,
    },
    /// Create KEY with VALUE; fails if it exists. Prints OK, or the created
    /// path with --ephemeral, --sequential or --container.
    Create(session::CreateArgs),
    /// Acquire the lock NAME (a directory such as /locks/build), run CMD
    /// while holding it and exit with CMD's exit code; without CMD, print
    /// the fencing token and hold until Ctrl-C or SIGTERM. If the lock is
    /// lost while CMD runs, CMD gets SIGTERM (SIGKILL after --kill-grace)
    /// and lockctl exits 1.
    Lock(lock::LockArgs),
    /// Campaign in the election NAME as IDENTITY, printing each change
    /// (`leader: IDENTITY (token N)` / `not leader`) and running CMD only
    /// while leader; with --observe, print the leader and every change.
    Elect(elect::ElectArgs),
    /// Session (lease) commands.
    Session {
        #[command(subcommand)]
        cmd: session::SessionCmd,
    },
    /// Delete KEY; prints the number of nodes deleted.
    #[command(alias = "delete")]
    Del {
        /// Absolute path.
        key: String,
        /// Delete the whole subtree.
        #[arg(long)]
        recursive: bool,
        /// Fail unless the node has exactly this version.
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// List the children of PATH.
    Ls {
        /// Absolute path.
        path: String,
        /// Read the contacted member's local state (may be stale).
        #[arg(long)]
        serializable: bool,
        /// Answer only from a state that includes this revision (e.g. the
        /// revision a write of yours returned); with --serializable, a
        /// read-your-writes read without a leader round trip.
        #[arg(long, default_value_t = 0)]
        min_revision: u64,
    },
    /// Run a transaction read from stdin (see --help for the format).
    #[command(long_about = TXN_HELP)]
    Txn,
    /// Show the status of every endpoint.
    Status,
    /// Initialize a new cluster. MEMBER is ID=HOST:PORT; none means the
    /// contacted member alone.
    Init {
        /// Initial voters as ID=HOST:PORT.
        members: Vec<String>,
    },
    /// Membership commands.
    Member {
        #[command(subcommand)]
        cmd: MemberCmd,
    },
    /// Leadership commands.
    Leader {
        #[command(subcommand)]
        cmd: LeaderCmd,
    },
    /// Make the contacted member take a snapshot.
    Snapshot,
    /// Stream changes of PATH, one line per event, until Ctrl-C
    /// (`PUT /path value rev=N`, `DELETE /path rev=N`; JSON lines with -o json).
    /// Resumes on another member when the serving one fails.
    Watch {
        /// Absolute path (the key, subtree root or prefix).
        path: String,
        /// Watch every path that starts with PATH (string prefix).
        #[arg(long, conflicts_with = "subtree")]
        prefix: bool,
        /// Watch PATH and every node below it.
        #[arg(long)]
        subtree: bool,
        /// First revision to show (default: changes from now on).
        #[arg(long, value_name = "N")]
        from_rev: Option<u64>,
        /// Include each node's previous value.
        #[arg(long)]
        prev: bool,
    },
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// List members.
    List,
    /// Add a member as a learner and wait until it has caught up.
    Add {
        /// Member id.
        id: u64,
        /// Member address (host:port).
        addr: String,
        /// Return without waiting for the learner to catch up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Promote a learner to voter.
    Promote {
        /// Member id.
        id: u64,
    },
    /// Remove a member.
    Remove {
        /// Member id.
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum LeaderCmd {
    /// Transfer leadership to voter ID.
    Transfer {
        /// Member id.
        id: u64,
    },
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds")),
    }
}

/// How the process ends: exit code and optional error line.
struct Fail {
    code: u8,
    msg: Option<String>,
}

impl Fail {
    fn usage(msg: impl Into<String>) -> Self {
        Fail {
            code: 2,
            msg: Some(msg.into()),
        }
    }
    fn runtime(msg: impl Into<String>) -> Self {
        Fail {
            code: 1,
            msg: Some(msg.into()),
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidEndpoint(_) | Error::InvalidArgument(_) => Fail::usage(e.to_string()),
            e => Fail::runtime(e.to_string()),
        }
    }
}

/// Maps NOT_FOUND to the server's message (which names the path and, for a
/// write, the missing parent), falling back to `PATH: not found`.
fn not_found_on(path: &str) -> impl FnOnce(Error) -> Fail + '_ {
    move |e| match e {
        Error::NotFound(m) if !m.is_empty() => Fail::runtime(m),
        Error::NotFound(_) => Fail::runtime(format!("{path}: not found")),
        e => e.into(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    return ExitCode::SUCCESS;
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    return ExitCode::from(2);
                }
                _ => {
                    let rendered = e.render().to_string();
                    let head: Vec<&str> = rendered
                        .lines()
                        .take_while(|l| !l.trim().is_empty())
                        .map(str::trim)
                        .collect();
                    let head = head.join(" ");
                    let head = head.strip_prefix("error: ").unwrap_or(&head);
                    eprintln!("Error: {head} (see lockctl --help)");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Some(m) = f.msg {
                eprintln!("Error: {}", one_line(&m));
            }
            ExitCode::from(f.code)
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("Error: cannot encode JSON: {e}"),
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn node_json(n: &proto::Node) -> Value {
    let mut v = json!({
        "path": n.path,
        "version": n.version,
        "create_revision": n.create_revision,
        "mod_revision": n.mod_revision,
        "num_children": n.num_children,
    });
    if n.ephemeral_owner != 0 {
        v["ephemeral_owner"] = json!(n.ephemeral_owner);
    }
    if n.container {
        v["container"] = json!(true);
    }
    match std::str::from_utf8(&n.data) {
        Ok(s) => v["value"] = json!(s),
        Err(_) => v["value_hex"] = json!(hex(&n.data)),
    }
    v
}

fn opt_node_json(n: Option<&proto::Node>) -> Value {
    n.map(node_json).unwrap_or(Value::Null)
}

fn revision(h: Option<&proto::ResponseHeader>) -> u64 {
    h.map(|h| h.revision).unwrap_or(0)
}

fn role_name(role: i32) -> &'static str {
    match proto::Role::try_from(role) {
        Ok(proto::Role::Leader) => "leader",
        Ok(proto::Role::Follower) => "follower",
        Ok(proto::Role::Learner) => "learner",
        Ok(proto::Role::Candidate) => "candidate",
        Ok(proto::Role::Uninitialized) => "uninitialized",
        _ => "unknown",
    }
}

/// Prints rows as left-aligned columns separated by two spaces.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for r in rows {
        // The last cell of a row does not widen its column (error rows).
        for (i, c) in r.iter().enumerate().take(r.len().saturating_sub(1)) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

fn members_out(out: Output, members: &[proto::Member]) {
    if out == Output::Json {
        let arr: Vec<Value> = members
            .iter()
            .map(|m| {
                json!({"id": m.id, "addr": m.addr, "voter": m.voter,
                       "type": if m.voter { "voter" } else { "learner" }})
            })
            .collect();
        print_json(&Value::Array(arr));
        return;
    }
    let mut rows = vec![vec!["ID".to_string(), "ADDR".into(), "TYPE".into()]];
    for m in members {
        rows.push(vec![
            m.id.to_string(),
            m.addr.clone(),
            if m.voter { "voter" } else { "learner" }.into(),
        ]);
    }
    print_table(&rows);
}

fn parse_member(s: &str) -> Result<proto::Member, Fail> {
    let bad = || Fail::usage(format!("invalid member '{s}': expected ID=HOST:PORT"));
    let (id, addr) = s.split_once('=').ok_or_else(bad)?;
    let id = id.trim().parse::<u64>().map_err(|_| bad())?;
    if addr.trim().is_empty() {
        return Err(bad());
    }
    Ok(proto::Member {
        id,
        addr: addr.trim().to_string(),
        voter: true,
    })
}

async fn run(cli: Cli) -> Result<(), Fail> {
    let endpoints: Vec<String> = cli
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let opts = ClientOptions {
        request_timeout: Duration::from_secs_f64(cli.timeout),
        retry_budget: Duration::from_secs_f64(cli.retry_budget),
    };
    let client = Client::connect_with(endpoints, opts)?;
    let out = cli.output;
    match cli.cmd {
        Cmd::Put {
            key,
            value,
            expected_version,
            parents,
        } => {
            let r = client
                .put_with(proto::PutRequest {
                    path: key.clone(),
                    data: value.into_bytes(),
                    expected_version,
                    parents,
                })
                .await
                .map_err(not_found_on(&key))?;
            if out == Output::Json {
                print_json(&json!({"revision": revision(r.header.as_ref()),
                    "created": r.created, "node": opt_node_json(r.node.as_ref())}));
            } else {
                println!("OK");
            }
        }
        Cmd::Create(args) => session::create(&client, out, args).await?,
        Cmd::Lock(args) => lock::lock(&client, out, args).await?,
        Cmd::Elect(args) => elect::elect(&client, out, args).await?,
        Cmd::Session { cmd } => session::session_cmd(&client, out, cmd).await?,
        Cmd::Get {
            key,
            serializable,
            min_revision,
        } => {
            let r = client
                .get_with(proto::GetRequest {
                    path: key.clone(),
                    serializable,
                    min_revision,
                })
                .await
                .map_err(not_found_on(&key))?;
            let Some(node) = r.node.as_ref() else {
                return Err(Fail::runtime(format!("{key}: not found")));
            };
            if out == Output::Json {
                print_json(&json!({"revision": revision(r.header.as_ref()),
                    "node": node_json(node)}));
            } else {
                println!("{}", String::from_utf8_lossy(&node.data));
            }
        }
        Cmd::Del {
            key,
            recursive,
            expected_version,
        } => {
            let r = client
                .delete_with(proto::DeleteRequest {
                    path: key.clone(),
                    expected_version,
                    recursive,
                })
                .await
                .map_err(not_found_on(&key))?;
            if out == Output::Json {
                print_json(&json!({"revision": revision(r.header.as_ref()),
                    "deleted": r.deleted}));
            } else {
                println!("{}", r.deleted);
            }
        }
        Cmd::Ls {
            path,
            serializable,
            min_revision,
        } => {
            let r = client
                .list_with(proto::ListRequest {
                    path: path.clone(),
                    serializable,
                    min_revision,
                })
                .await
                .map_err(not_found_on(&path))?;
            if out == Output::Json {
                // Children come with metadata only (the server omits their
                // data): do not print an empty "value" for them.
                let children = r.children.iter().map(|c| {
                    let mut v = node_json(c);
                    if let Some(o) = v.as_object_mut() {
                        o.remove("value");
                        o.remove("value_hex");
                    }
                    v
                });
                print_json(&Value::Array(children.collect()));
            } else {
                for c in &r.children {
                    let name = c.path.rsplit('/').next().unwrap_or(&c.path);
                    println!("{name}");
                }
            }
        }
        Cmd::Txn => {
            let mut spec = String::new();
            std::io::stdin()
                .read_to_string(&mut spec)
                .map_err(|e| Fail::usage(format!("cannot read txn spec from stdin: {e}")))?;
            let req = txn::parse(&spec).map_err(|e| Fail::usage(e.to_string()))?;
            let r = client.txn(req.clone()).await?;
            let ops = if r.succeeded {
                &req.success
            } else {
                &req.failure
            };
            txn_out(out, &r, ops);
        }
        Cmd::Status => return status(&client, out).await,
        Cmd::Init { members } => {
            let members = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<Result<Vec<_>, _>>()?;
            let r = client.cluster().initialize(members).await?;
            if out == Output::Json {
                print_json(&json!({"initialized": true,
                    "cluster_id": r.header.as_ref().map(|h| h.cluster_id.clone()).unwrap_or_default()}));
            } else {
                println!("OK");
            }
        }
        Cmd::Member { cmd } => {
            let cluster = client.cluster();
            let members = match cmd {
                MemberCmd::List => cluster.status().await?.members,
                MemberCmd::Add { id, addr, no_wait } => {
                    cluster.add_learner(id, addr, !no_wait).await?.members
                }
                MemberCmd::Promote { id } => cluster.promote(id).await?.members,
                MemberCmd::Remove { id } => cluster.remove_member(id).await?.members,
            };
            members_out(out, &members);
        }
        Cmd::Leader {
            cmd: LeaderCmd::Transfer { id },
        } => {
            let r = client.cluster().transfer_leader(id).await?;
            if out == Output::Json {
                print_json(&json!({"leader_id": r.leader_id}));
            } else {
                println!("leader is now {}", r.leader_id);
            }
        }
        Cmd::Watch {
            path,
            prefix,
            subtree,
            from_rev,
            prev,
        } => watch(&client, out, path, prefix, subtree, from_rev, prev).await?,
        Cmd::Snapshot => {
            let r = client.cluster().snapshot().await?;
            let member = r.header.as_ref().map(|h| h.member_id).unwrap_or(0);
            if out == Output::Json {
                print_json(&json!({"member_id": member, "snapshot_index": r.snapshot_index}));
            } else {
                println!("snapshot at index {} on member {member}", r.snapshot_index);
            }
        }
    }
    Ok(())
}

fn txn_out(out: Output, r: &proto::TxnResponse, ops: &[proto::Op]) {
    let mut lines = Vec::new();
    let mut results = Vec::new();
    for (i, res) in r.results.iter().enumerate() {
        let path = match ops.get(i).and_then(|o| o.op.as_ref()) {
            Some(op::Op::Put(p)) => p.path.clone(),
            Some(op::Op::Create(c)) => c.path.clone(),
            Some(op::Op::Delete(d)) => d.path.clone(),
            Some(op::Op::Get(g)) => g.path.clone(),
            None => String::new(),
        };
        match &res.result {
            Some(op_result::Result::Put(p)) => {
                lines.push(format!("put {path} OK"));
                results.push(json!({"op": "put", "path": path, "created": p.created,
                    "node": opt_node_json(p.node.as_ref())}));
            }
            Some(op_result::Result::Create(c)) => {
                lines.push(format!("create {path} OK"));
                results.push(json!({"op": "create", "path": path,
                    "node": opt_node_json(c.node.as_ref())}));
            }
            Some(op_result::Result::Delete(d)) => {
                lines.push(format!("del {path} {}", d.deleted));
                results.push(json!({"op": "del", "path": path, "deleted": d.deleted}));
            }
            Some(op_result::Result::Get(g)) => {
                match &g.node {
                    Some(n) => {
                        lines.push(format!("get {path} {}", String::from_utf8_lossy(&n.data)))
                    }
                    None => lines.push(format!("get {path} (not found)")),
                }
                results.push(json!({"op": "get", "path": path,
                    "node": opt_node_json(g.node.as_ref())}));
            }
            None => {
                lines.push(format!("? {path}"));
                results.push(Value::Null);
            }
        }
    }
    if out == Output::Json {
        print_json(&json!({"succeeded": r.succeeded,
            "revision": revision(r.header.as_ref()), "results": results}));
    } else {
        println!("{}", if r.succeeded { "SUCCESS" } else { "FAILURE" });
        for l in lines {
            println!("{l}");
        }
    }
}

async fn status(client: &Client, out: Output) -> Result<(), Fail> {
    let handles: Vec<_> = client
        .endpoints()
        .iter()
        .map(|ep| {
            let cluster = client.cluster();
            let ep = ep.clone();
            tokio::spawn(async move {
                let r = cluster.status_of(&ep).await;
                (ep, r)
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        match h.await {
            Ok(r) => results.push(r),
            Err(e) => return Err(Fail::runtime(format!("status task failed: {e}"))),
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(ep, _)| ep.as_str())
        .collect();
    if out == Output::Json {
        let arr: Vec<Value> = results
            .iter()
            .map(|(ep, r)| match r {
                Ok(s) => json!({
                    "endpoint": ep,
                    "id": s.id,
                    "role": role_name(s.role),
                    "leader": s.leader_id,
                    "leader_addr": s.leader_addr,
                    "term": s.term,
                    "commit": s.commit_index,
                    "applied": s.applied_index,
                    "last_log_index": s.last_log_index,
                    "snapshot_index": s.snapshot_index,
                    "cluster_id": s.cluster_id,
                    "joint": s.joint,
                    "version": s.version,
                    "members": s.members.iter().map(|m| json!({"id": m.id, "addr": m.addr, "voter": m.voter})).collect::<Vec<_>>(),
                }),
                Err(e) => json!({"endpoint": ep, "error": one_line(&e.to_string())}),
            })
            .collect();
        print_json(&Value::Array(arr));
    } else {
        let mut rows = vec![[
            "ENDPOINT", "ID", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
        for (ep, r) in &results {
            rows.push(match r {
                Ok(s) => vec![
                    ep.clone(),
                    s.id.to_string(),
                    role_name(s.role).into(),
                    if s.leader_id == 0 {
                        "-".into()
                    } else {
                        s.leader_id.to_string()
                    },
                    s.term.to_string(),
                    s.commit_index.to_string(),
                    s.applied_index.to_string(),
                ],
                Err(e) => vec![ep.clone(), format!("error: {}", one_line(&e.to_string()))],
            });
        }
        print_table(&rows);
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Fail::runtime(format!(
            "{} of {} endpoints failed: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        )))
    }
}

fn event_line(out: Output, e: &lockd_client::WatchEvent) -> String {
    use lockd_client::WatchEventKind;
    let kind = match e.kind {
        WatchEventKind::Put => "PUT",
        WatchEventKind::Delete => "DELETE",
    };
    if out == Output::Json {
        let mut v = json!({"type": kind, "path": e.node.path, "revision": e.revision});
        if e.kind == WatchEventKind::Put {
            v["node"] = node_json(&e.node);
        }
        if let Some(p) = &e.prev_node {
            v["prev_node"] = node_json(p);
        }
        return v.to_string();
    }
    let mut line = match e.kind {
        WatchEventKind::Put => format!(
            "PUT {} {} rev={}",
            e.node.path,
            String::from_utf8_lossy(&e.node.data),
            e.revision
        ),
        WatchEventKind::Delete => format!("DELETE {} rev={}", e.node.path, e.revision),
    };
    if let Some(p) = &e.prev_node {
        line.push_str(&format!(" prev={}", String::from_utf8_lossy(&p.data)));
    }
    line
}

async fn watch(
    client: &Client,
    out: Output,
    path: String,
    prefix: bool,
    subtree: bool,
    from_rev: Option<u64>,
    prev: bool,
) -> Result<(), Fail> {
    use lockd_client::{WatchOptions, WatchScope};
    use std::io::Write;
    let opts = WatchOptions {
        path,
        scope: if prefix {
            WatchScope::Prefix
        } else if subtree {
            WatchScope::Subtree
        } else {
            WatchScope::Key
        },
        start_revision: from_rev.unwrap_or(0),
        prev_node: prev,
        wait_caught_up: from_rev.is_none(),
        ..WatchOptions::default()
    };
    let mut w = client.watch(opts);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            e = w.next() => {
                let e = e?;
                let mut stdout = std::io::stdout().lock();
                if writeln!(stdout, "{}", event_line(out, &e)).and_then(|_| stdout.flush()).is_err() {
                    // stdout closed (e.g. piped into head): done.
                    return Ok(());
                }
            }
        }
    }
}
