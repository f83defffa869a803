//! The queue's background work: the delivery task of each peer (one event at a time, in order,
//! retried with backoff while the transport fails, each reply stored), and the pruning of
//! finished events past their retention.

use super::*;

/// Forget finished events past their retention, now and then, while the node runs.
pub(super) async fn prune_loop(inner: Arc<Inner>, store: Arc<Store>) {
    loop {
        let before = now_ms().saturating_sub(millis(inner.settings.retention));
        let pruned = blocking({
            let store = store.clone();
            move || store.prune(before, MAX_FINISHED)
        })
        .await;
        if let Err(e) = pruned {
            warn!(cause = %e, "the queue could not forget old finished events");
        }
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

/// How an event reaches its peer: on the connection here, or through the replica of the
/// cluster that holds the client.
enum Route {
    Local(Connection),
    Cluster,
}

/// Whether `peer` is a client another replica of this server's cluster holds now.
fn held_elsewhere(pipe: &Pipe, peer: &str) -> bool {
    match pipe {
        Pipe::Server(server) => server
            .cluster()
            .is_some_and(|c| c.remote_clients().iter().any(|r| r.identity == peer)),
        Pipe::Client(_) => false,
    }
}

/// Wait up to `wait` for the connection to `peer`.
async fn connection(pipe: &Pipe, peer: &str, wait: Duration) -> Result<Connection, CallError> {
    match pipe {
        Pipe::Client(client) => client.wait_connected(wait).await,
        Pipe::Server(server) => server.registry().wait_for(peer, wait).await,
    }
}

/// Whether a call that failed this way may succeed later: the transport failed, not the
/// event.
fn transient(err: &CallError) -> bool {
    matches!(
        err,
        CallError::PipeClosed(_)
            | CallError::Timeout(_)
            | CallError::NotConnected(_)
            | CallError::Overloaded(_)
            | CallError::ShuttingDown(_)
            | CallError::Ambiguous(_)
    )
}

/// The event of a stored record, with its delivery id.
fn request_of(seq: u64, record: &Record, body: Vec<u8>) -> Request {
    let mut headers = Headers::new();
    for (name, value) in &record.headers {
        let _ = headers.insert(name, value);
    }
    Request {
        verb: record.verb.clone(),
        noun: record.noun.clone(),
        parameters: record.parameters.clone(),
        query: record.query.clone(),
        content_type: record.content_type.clone(),
        body: body.into(),
        headers,
        trace: None,
        delivery_id: Some(id_of(seq, record.token)),
    }
}

/// The HTTP status a reply maps to, as the front door maps it.
fn status_of(reply: &Reply) -> u16 {
    reply
        .status
        .filter(|s| (100..=599).contains(s))
        .unwrap_or(match reply.code {
            codes::OK => 200,
            codes::NO_HANDLER => 404,
            _ => 500,
        })
}

/// The delivery task of `peer`: its pending events, one at a time, in order, for as long as
/// it has any; it ends when the queue is empty (a new event starts another).
pub(super) async fn deliver(inner: Arc<Inner>, peer: String, worker: Arc<Worker>) {
    let _exit = WorkerExit {
        inner: inner.clone(),
        peer: peer.clone(),
        worker: worker.clone(),
    };
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut swept = Instant::now();
    loop {
        if inner.drain.is_cancelled() {
            return;
        }
        let Ok(store) = inner.store().await else {
            lock(&inner.workers).remove(&peer);
            return;
        };
        let generation = worker.generation.load(Ordering::Acquire);
        let head = blocking({
            let (store, peer) = (store.clone(), peer.clone());
            move || store.head(&peer)
        })
        .await;
        let (seq, mut record, body) = match head {
            Ok(Some(head)) => head,
            Ok(None) => {
                let mut workers = lock(&inner.workers);
                if worker.generation.load(Ordering::Acquire) == generation {
                    workers.remove(&peer);
                    return;
                }
                continue;
            }
            Err(e) => {
                warn!(%peer, cause = %e, "the queue's store cannot be read; trying again");
                if pause(&inner, CHECK_EVERY).await {
                    return;
                }
                continue;
            }
        };
        let now = now_ms();
        if now >= record.expires_ms {
            // The head, and every other event of the peer whose TTL has passed.
            let expired = blocking({
                let (store, peer) = (store.clone(), peer.clone());
                move || store.expire_due(&peer, now)
            })
            .await;
            match expired {
                Ok(freed) => {
                    if freed.count > 0 {
                        info!(%peer, events = freed.count, "queued events expired");
                        inner.release(&peer, freed);
                    }
                }
                Err(e) => {
                    warn!(%peer, cause = %e, "the queue could not expire events");
                    if pause(&inner, CHECK_EVERY).await {
                        return;
                    }
                }
            }
            continue;
        }
        // Wait for the peer, with the head in hand (not read again each second), expiring
        // the events behind it as their TTLs pass.
        let conn = loop {
            let now = now_ms();
            if now >= record.expires_ms {
                break None;
            }
            if swept.elapsed() >= CHECK_EVERY {
                swept = Instant::now();
                let expired = blocking({
                    let (store, peer) = (store.clone(), peer.clone());
                    move || store.expire_due(&peer, now)
                })
                .await;
                match expired {
                    Ok(freed) if freed.count > 0 => {
                        info!(%peer, events = freed.count, "queued events expired");
                        inner.release(&peer, freed);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(%peer, cause = %e, "the queue could not expire events"),
                }
            }
            let left = Duration::from_millis(record.expires_ms.saturating_sub(now));
            let asked = Instant::now();
            let conn = tokio::select! {
                _ = inner.drain.cancelled() => return,
                conn = connection(&inner.pipe, &peer, left.min(CHECK_EVERY)) => conn,
            };
            match conn {
                Ok(conn) => break Some(Route::Local(conn)),
                // In a cluster, a client connected to another replica is reached through it.
                Err(_) if held_elsewhere(&inner.pipe, &peer) => break Some(Route::Cluster),
                // An answer at once (an address several clients share) must not spin.
                Err(_) if asked.elapsed() < CHECK_EVERY / 10 => {
                    if pause(&inner, CHECK_EVERY).await {
                        return;
                    }
                }
                Err(_) => {}
            }
        };
        let Some(route) = conn else {
            continue;
        };
        let timeout = Duration::from_millis(record.timeout_ms.max(1));
        let request = request_of(seq, &record, body);
        let call = async {
            match (route, &inner.pipe) {
                (Route::Local(conn), _) => conn.call(request, timeout).await,
                (Route::Cluster, Pipe::Server(server)) => {
                    server.call(&peer, request, Some(timeout)).await
                }
                (Route::Cluster, Pipe::Client(client)) => client.call(request, Some(timeout)).await,
            }
        };
        let result = tokio::select! {
            _ = inner.stop.cancelled() => return,
            result = call => result,
        };
        record.attempts = record.attempts.saturating_add(1);
        let outcome = match result {
            Ok(mut reply) => {
                let limit = usize::try_from(inner.settings.max_body).unwrap_or(usize::MAX);
                let (body, dropped) = match reply.collect_body(limit).await {
                    Ok(body) => (body, None),
                    Err(BodyError::TooLarge { limit }) => (
                        bytes::Bytes::new(),
                        Some(format!("over the queue's limit of {limit} bytes")),
                    ),
                    Err(e) => (bytes::Bytes::new(), Some(format!("cut short: {e}"))),
                };
                record.reply = Some(StoredReply {
                    status: status_of(&reply),
                    code: reply.code,
                    content_type: reply.content_type.clone(),
                    body_dropped: dropped,
                });
                record.state = State::Delivered;
                record.last_error = None;
                Some(body)
            }
            Err(e) if transient(&e) && record.attempts < inner.settings.max_attempts => {
                record.last_error = Some(e.to_string());
                let update = blocking({
                    let (store, record) = (store.clone(), record.clone());
                    move || store.update(seq, &record)
                })
                .await;
                if let Err(e) = update {
                    warn!(%peer, cause = %e, "the queue could not record an attempt");
                }
                if pause(&inner, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                record.state = State::Failed;
                record.last_error = Some(if transient(&e) {
                    format!("{} attempts failed; the last: {e}", record.attempts)
                } else {
                    e.to_string()
                });
                None
            }
        };
        backoff.reset();
        record.finished_ms = Some(now_ms());
        let size = record.size;
        let state = record.state;
        let finished = blocking({
            let store = store.clone();
            move || store.finish(seq, &record, outcome.as_deref())
        })
        .await;
        match finished {
            Ok(()) => {
                if state == State::Failed {
                    warn!(%peer, seq, "a queued event failed");
                }
                inner.release(
                    &peer,
                    Usage {
                        count: 1,
                        bytes: size,
                    },
                )
            }
            Err(e) => {
                // It stays pending and goes again, with the same id.
                warn!(%peer, cause = %e, "the queue could not record a delivery; it will go again");
                if pause(&inner, CHECK_EVERY).await {
                    return;
                }
            }
        }
    }
}

/// Sleep `delay` unless the queue stops (or drains) first; returns whether it stopped.
pub(super) async fn pause(inner: &Inner, delay: Duration) -> bool {
    tokio::select! {
        _ = inner.drain.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// A delivery task's entry leaves the queue's table when the task ends, however it ends
/// (unless a newer task took its place): so that a store being handed back knows when no
/// task is left.
struct WorkerExit {
    inner: Arc<Inner>,
    peer: String,
    worker: Arc<Worker>,
}

impl Drop for WorkerExit {
    fn drop(&mut self) {
        let mut workers = lock(&self.inner.workers);
        if workers
            .get(&self.peer)
            .is_some_and(|w| Arc::ptr_eq(w, &self.worker))
        {
            workers.remove(&self.peer);
        }
    }
}
