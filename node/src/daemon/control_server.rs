//! The control socket's server side: one task per client connection, reading one request line,
//! handing it to the event loop, and writing the streamed events and the reply back, with a bounded
//! backlog and a write timeout so a client that stops reading cannot make the daemon buffer.
use super::*;

/// The two actors' control mailboxes; each request goes to the one that owns its answer.
#[derive(Clone)]
pub(super) struct Routes {
    net: mpsc::Sender<Ctl>,
    jobs: mpsc::Sender<Ctl>,
}

impl Routes {
    fn for_request(&self, r: &Request) -> &mpsc::Sender<Ctl> {
        match r {
            Request::Submit { .. }
            | Request::Jobs
            | Request::JobShow { .. }
            | Request::JobCancel { .. }
            | Request::JobFollow { .. }
            | Request::ModelsChanged => &self.jobs,
            Request::Status
            | Request::Peers
            | Request::PairList
            | Request::PairInvite { .. }
            | Request::PairJoin { .. }
            | Request::PairAdd { .. }
            | Request::PairRemove { .. }
            | Request::Shutdown => &self.net,
        }
    }
}

pub(super) async fn accept_loop(listener: tokio::net::UnixListener, net: mpsc::Sender<Ctl>, jobs: mpsc::Sender<Ctl>) {
    let routes = Routes { net, jobs };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_client(stream, routes.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client(stream: tokio::net::UnixStream, routes: Routes) {
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r.take(control::MAX_REQUEST as u64 + 1));
    let mut line = String::new();
    // A client that connects and never writes must not hold a task forever.
    let read = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await;
    let resp = match read.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no request within 10 s",
        ))
    }) {
        Ok(_) if line.len() > control::MAX_REQUEST => Response::err("request too large"),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (reply, mut rx) = oneshot::channel();
                let (etx, mut erx) = mpsc::channel::<Event>(control::MAX_EVENT_BACKLOG);
                if routes
                    .for_request(&req)
                    .clone()
                    .send(Ctl {
                        req,
                        reply,
                        events: etx,
                    })
                    .await
                    .is_err()
                {
                    Response::err("the daemon is shutting down")
                } else {
                    // Events go out as they come; the reply ends the exchange. A client that went away, or
                    // stopped reading for CLIENT_WRITE_TIMEOUT, is dropped: its job goes on, and the daemon,
                    // whose sends into the closed channel then fail, forgets this watcher.
                    loop {
                        tokio::select! {
                            r = &mut rx => break r.unwrap_or_else(|_| Response::err("the daemon dropped the request")),
                            Some(ev) = erx.recv() => {
                                let mut out = serde_json::to_vec(&ev).unwrap_or_default();
                                out.push(b'\n');
                                match tokio::time::timeout(control::CLIENT_WRITE_TIMEOUT, w.write_all(&out)).await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(_)) => return,
                                    Err(_) => {
                                        tracing::warn!("dropping a control client that stopped reading its events");
                                        return;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => Response::err(format!("malformed request: {e}")),
        },
        Err(e) => Response::err(format!("reading request: {e}")),
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = tokio::time::timeout(control::CLIENT_WRITE_TIMEOUT, w.write_all(&out)).await;
}
