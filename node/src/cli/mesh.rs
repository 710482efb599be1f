//! The commands that talk to the daemon over its control socket (`start`, `stop`, `status`, `peers`,
//! `pair`, `submit`, `jobs`), and `init`/`id`. Replies are read into the types of [`crate::api`].
use super::args::{parse_ttl, JobsCmd, PairCmd, SubmitCmd};
use super::local::{finetune_job, infer_job, score_job};
use crate::api::{ConnectionKind, InviteReply, Paired, PeerInfo, Request, Status, TrustEntry};
use crate::control;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// One request with the CLI's default patience (pairing waits on the network).
fn call<T: DeserializeOwned>(home: &Path, req: Request) -> anyhow::Result<T> {
    Ok(control::call(home, &req, Duration::from_secs(60))?)
}

pub fn init(home: &Path, name: Option<String>) -> anyhow::Result<()> {
    let created = crate::init(home, name.as_deref())?;
    let id = crate::identity::load(home)?.public().to_peer_id();
    if created {
        println!("initialized {}\npeer id: {id}", home.display());
    } else {
        println!(
            "{} is already initialized (peer id {id}); identity and config left untouched",
            home.display()
        );
    }
    Ok(())
}

pub fn id(home: &Path) -> anyhow::Result<()> {
    let id = crate::identity::load(home)?.public().to_peer_id();
    println!("{id}");
    Ok(())
}

pub fn start(home: &Path, opts: crate::daemon::StartOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::daemon::run(home, opts))
}

pub fn stop(home: &Path) -> anyhow::Result<()> {
    call::<String>(home, Request::Shutdown)?;
    // Wait for the socket to go away, so scripts can start a new daemon right after.
    let t0 = std::time::Instant::now();
    while control::is_running(home) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("stopped");
    Ok(())
}

pub fn status(home: &Path, json: bool) -> anyhow::Result<()> {
    let v: Status = call(home, Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} ({})", v.name, v.id);
    println!(
        "peers: {} paired, {} connected; open invites: {}; relay server: {}",
        v.paired_peers, v.connected_peers, v.open_invites, v.relay_server
    );
    for a in &v.listen_addresses {
        println!("listening: {a}");
    }
    match &v.api_url {
        Some(u) => println!("API: {u} (OpenAI-compatible)"),
        None => println!("API: off"),
    }
    let c = &v.capabilities;
    println!(
        "device: {} ({}, {}), ternary matmul {:.1} GOPS, score {:.1}",
        c.device, c.backend, c.device_type, c.ternary_gops, c.score
    );
    Ok(())
}

pub fn peers(home: &Path, json: bool) -> anyhow::Result<()> {
    let list: Vec<PeerInfo> = call(home, Request::Peers)?;
    if json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no paired peers (pair with `bitnode pair invite` / `bitnode pair join`)");
    }
    for p in list {
        let conn = match p.connection {
            Some(ConnectionKind::Direct) => "direct",
            Some(ConnectionKind::Relayed) => "relayed",
            None => "offline",
        };
        let rtt = p.rtt_ms.map(|r| format!(" {r:.1} ms")).unwrap_or_default();
        let (score, dev) = match &p.capabilities {
            Some(c) => (format!(" score {:.1}", c.score), format!(" on {}", c.device)),
            None => (String::new(), String::new()),
        };
        println!("{:<16} {} {conn}{rtt}{score}{dev}", p.name, p.id);
    }
    Ok(())
}

/// An inference job runs on a warm engine of whichever device takes it, loaded as the model's files say:
/// `--activation` is for local runs (and `submit finetune`, whose request carries it).
fn refuse_activation(a: Option<bitnode_engine::config::Activation>) -> anyhow::Result<()> {
    if a.is_some() {
        anyhow::bail!(
            "--activation applies to local `bitnode infer` and `bitnode score` (and to `submit finetune`); a \
             device serving this job reads the activation from the model file (its `{{arch}}.hidden_activation` \
             key, else the architecture and vocabulary)"
        );
    }
    Ok(())
}

/// `bitnode submit infer|score|finetune`: the job the local command would run, sent to the daemon.
pub fn submit(home: &Path, cmd: SubmitCmd) -> anyhow::Result<()> {
    let (spec, paths, submit, json) = match cmd {
        SubmitCmd::Infer { args, submit } => {
            refuse_activation(args.activation)?;
            let json = args.json;
            let (spec, paths, _) = infer_job(args, home)?;
            (spec, paths, submit, json)
        }
        SubmitCmd::Score { args, submit } => {
            refuse_activation(args.activation)?;
            let json = args.json;
            let (spec, paths, _) = score_job(args, home)?;
            (spec, paths, submit, json)
        }
        SubmitCmd::Finetune { args, submit } => {
            let json = args.json;
            let (spec, paths) = finetune_job(*args)?;
            (spec, paths, submit, json)
        }
    };
    let opts = crate::submit::SubmitOptions {
        to: submit.to,
        detach: submit.detach,
        json,
    };
    crate::submit::submit(home, spec, &paths, &opts)
}

pub fn jobs(home: &Path, json: bool, cmd: Option<JobsCmd>) -> anyhow::Result<()> {
    match cmd {
        None => crate::submit::list(home, json),
        Some(JobsCmd::Show { id, json: j }) => crate::submit::show(home, &id, json || j),
        Some(JobsCmd::Cancel { id }) => crate::submit::cancel(home, &id),
        Some(JobsCmd::Follow { id, json: j }) => crate::submit::follow(home, &id, json || j),
    }
}

pub fn pair(home: &Path, cmd: PairCmd) -> anyhow::Result<()> {
    match cmd {
        PairCmd::Invite { ttl, json } => {
            let ttl_secs = parse_ttl(&ttl)?;
            let v: InviteReply = call(home, Request::PairInvite { ttl_secs })?;
            let code = v.code.clone();
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{code}");
                eprintln!();
                if let Ok(q) = qrcode::QrCode::new(code.as_bytes()) {
                    let img = q.render::<qrcode::render::unicode::Dense1x2>().quiet_zone(true).build();
                    eprintln!("{img}");
                }
                eprintln!("On the other device: bitnode pair join <code>   (one use, valid for {ttl})");
            }
        }
        PairCmd::Join { code, json } => {
            // Parse locally first: a malformed or expired code gets its error without a daemon round trip.
            bitnode_protocol::invite::Invite::parse(&code, crate::trust::now_unix())?;
            let v: Paired = call(home, Request::PairJoin { code })?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("paired with {} ({})", v.name, v.peer_id);
            }
        }
        PairCmd::Add { peer_id, name, addr } => {
            let req = Request::PairAdd {
                peer: peer_id.clone(),
                name: name.clone(),
                addrs: addr.clone(),
            };
            match control::call::<Paired>(home, &req, Duration::from_secs(10)) {
                Ok(v) => println!("trusting {} as {}", peer_id, v.name),
                // No daemon: edit the trust list directly; the next `bitnode start` uses it.
                Err(control::ClientError::NotRunning(_)) => {
                    let id: libp2p::PeerId = peer_id
                        .parse()
                        .map_err(|_| anyhow::anyhow!("{peer_id:?} is not a peer id"))?;
                    let name = name.unwrap_or_else(|| crate::trust::default_name(&id));
                    bitnode_protocol::wire::check_name(&name)?;
                    let addrs: Vec<libp2p::Multiaddr> = addr
                        .iter()
                        .map(|a| a.parse().map_err(|e| anyhow::anyhow!("address {a:?}: {e}")))
                        .collect::<anyhow::Result<_>>()?;
                    let mut t = crate::trust::TrustList::load(home)?;
                    t.add(&id, &name, "manual", &addrs);
                    t.save(home)?;
                    println!("trusting {peer_id} as {name} (the daemon is not running; it will use this at start)");
                }
                Err(e) => return Err(e.into()),
            }
        }
        PairCmd::List { json } => {
            let v: Vec<TrustEntry> = match control::call(home, &Request::PairList, Duration::from_secs(10)) {
                Ok(v) => v,
                Err(control::ClientError::NotRunning(_)) => crate::trust::TrustList::load(home)?.entries(),
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else if v.is_empty() {
                println!("no paired peers");
            } else {
                for p in v {
                    println!("{:<16} {} (via {})", p.name, p.id, p.via);
                }
            }
        }
        PairCmd::Remove { peer } => match control::call::<Paired>(
            home,
            &Request::PairRemove { peer: peer.clone() },
            Duration::from_secs(10),
        ) {
            Ok(v) => println!("removed {} ({})", v.name, v.peer_id),
            Err(control::ClientError::NotRunning(_)) => {
                let mut t = crate::trust::TrustList::load(home)?;
                let id = t
                    .resolve(&peer)
                    .ok_or_else(|| anyhow::anyhow!("no paired peer is called {peer:?}"))?;
                let p = t.remove(&id).ok_or_else(|| anyhow::anyhow!("{id} is not paired"))?;
                t.save(home)?;
                println!("removed {} ({id})", p.name);
            }
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}
