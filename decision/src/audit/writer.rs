//! The audit writer: events from the request path are queued without blocking a decision, sealed
//! into this instance's chain by one writer thread, and handed to every sink. The request path
//! only pushes onto a bounded in-memory queue and wakes nobody while the writer is busy: the
//! writer takes the whole queue every `BATCH_WAIT` while events keep coming (and sleeps until
//! woken otherwise), so a busy instance pays no thread wake-up per event. Each round's sealed
//! lines go to a sink as one hand-over (one wake-up of the sink's thread, not one per line), and
//! sinks write what they are handed in batches (one `write` for a file). Each sink has its
//! own thread and a bounded queue; when a sink is slow or failing and its queue is full, its
//! events spill to a file on local disk, in order, and are replayed from there before anything
//! newer, so a slow sink loses nothing. A graceful stop seals a last checkpoint and drains every
//! queue and spill file (a sink still failing at the drain deadline keeps its spill file, which
//! is replayed at the next start).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};

use super::chain::Chain;
use super::event::Members;
use super::{AuditSettings, Fsync, SinkSettings, checkpoint};
use crate::clock;

/// The audit trail's counters, registered by `Audit::start`.
#[derive(Debug, Clone, Default)]
pub struct AuditMetrics {
    /// events sealed and handed to the sinks (`portcullis_audit_events_total`)
    pub events: Counter,
    /// events lost because the writer's queue was full, or a spill file refused them
    /// (`portcullis_audit_dropped_total`); the writer only seals in memory, so this stays zero
    /// unless it is starved of CPU or the disk is full
    pub dropped: Counter,
    /// events a slow sink spilled to disk (`portcullis_audit_spilled_total`)
    pub spilled: Counter,
    /// failed sink writes, each retried (`portcullis_audit_sink_errors_total`)
    pub sink_errors: Counter,
}

impl AuditMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("audit_events", "Audit events sealed and handed to the sinks", self.events.clone());
        registry.register(
            "audit_dropped",
            "Audit events lost because the writer's queue was full (target: zero)",
            self.dropped.clone(),
        );
        registry.register(
            "audit_spilled",
            "Audit events a slow sink spilled to local disk (replayed in order)",
            self.spilled.clone(),
        );
        registry.register("audit_sink_errors", "Failed audit sink writes (each retried)", self.sink_errors.clone());
    }
}

/// Events waiting for the writer at most.
const QUEUE: usize = 65_536;
/// How long the writer lets events gather after a batch before it takes the next one: at most
/// this much later on disk, and one wake-up per batch instead of one per event.
const BATCH_WAIT: Duration = Duration::from_millis(2);
/// Lines a sink writes in one go at most.
const SINK_BATCH: usize = 512;
/// How long a stop waits for a failing sink before leaving its spill file for the next start.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// An event for the trail, masked already: an object, or (a decision's) canonical JSON built
/// as it was made ([`Members`]), which the writer seals without a map.
#[derive(Debug, Clone)]
pub enum Event {
    Object(Map<String, Value>),
    Members(Members),
}

impl From<Map<String, Value>> for Event {
    fn from(m: Map<String, Value>) -> Event {
        Event::Object(m)
    }
}

impl From<Members> for Event {
    fn from(m: Members) -> Event {
        Event::Members(m)
    }
}

/// What the request path hands the writer.
#[derive(Default)]
struct Inbox {
    /// events not yet taken by the writer, oldest first (at most `QUEUE`)
    events: Mutex<Vec<Event>>,
    /// set by the writer before it sleeps with nothing to do: the next event wakes it
    idle: AtomicBool,
    /// set by `Audit::stop`: the writer seals what is queued, a last checkpoint, and ends
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic while holding it cannot leave the queue half-written (a Vec push or swap)
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The request path's handle on the audit trail.
pub struct Audit {
    inbox: Arc<Inbox>,
    /// the writer thread, woken when an event arrives while it is idle
    waker: Thread,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// headers masked besides the credential headers (lower case)
    pub mask: Vec<String>,
    pub instance: String,
    metrics: AuditMetrics,
}

impl Audit {
    /// Starts the writer and the sinks, and registers the trail's counters into `registry`.
    /// `runtime` runs anchor webhook POSTs. Errors: the spill folder cannot be made, a file sink
    /// cannot be opened, a thread cannot be started.
    pub fn start(
        s: &AuditSettings,
        runtime: Option<tokio::runtime::Handle>,
        registry: &mut Registry,
    ) -> std::io::Result<Arc<Audit>> {
        let metrics = AuditMetrics::default();
        metrics.register(registry);
        std::fs::create_dir_all(&s.spill_dir)?;
        let started = clock::now_micros();
        let chain_name = format!("{}/{}", s.instance, started / 1000);
        let mut sinks = Vec::new();
        for (i, sink) in s.sinks.iter().enumerate() {
            let spill = s.spill_dir.join(format!("{}-{i}-{}.spill", sanitize(&s.instance), sink.kind()));
            sinks.push(SinkHandle::start(sink.clone(), spill, s.sink_queue, &metrics)?);
        }
        let inbox = Arc::new(Inbox::default());
        let settings = s.clone();
        let events = metrics.events.clone();
        let writer_inbox = inbox.clone();
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(&writer_inbox, chain_name, settings, sinks, runtime, events))?;
        Ok(Arc::new(Audit {
            inbox,
            waker: writer.thread().clone(),
            writer: Mutex::new(Some(writer)),
            mask: s.mask_headers.clone(),
            instance: s.instance.clone(),
            metrics,
        }))
    }

    /// Queues an event (already masked); never blocks (a short lock on the queue). Counted as
    /// dropped when `QUEUE` events already wait or the trail is stopped.
    pub fn record(&self, event: impl Into<Event>) {
        let event = event.into();
        {
            let mut q = lock(&self.inbox.events);
            if q.len() >= QUEUE || self.inbox.stop.load(Ordering::Acquire) {
                drop(q);
                self.metrics.dropped.inc();
                return;
            }
            q.push(event);
        }
        if self.inbox.idle.swap(false, Ordering::AcqRel) {
            self.waker.unpark();
        }
    }

    /// Seals what is queued and a last checkpoint, and drains every sink; returns when done.
    pub fn stop(&self) {
        self.ask_to_stop();
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Audit {
    /// Tells the writer to seal what is queued and a last checkpoint, and close its sinks.
    fn ask_to_stop(&self) {
        self.inbox.stop.store(true, Ordering::Release);
        self.waker.unpark();
    }
}

impl Drop for Audit {
    /// Dropped without `stop` (serving ended early): the writer still finishes, on its own
    /// thread.
    fn drop(&mut self) {
        self.ask_to_stop();
    }
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn write_loop(
    inbox: &Inbox,
    chain_name: String,
    s: AuditSettings,
    sinks: Vec<SinkHandle>,
    runtime: Option<tokio::runtime::Handle>,
    events: Counter,
) {
    let mut chain = Chain::new(&chain_name);
    let mut covered = 0;
    let mut next = clock::instant() + s.checkpoint_every;
    // this round's sealed lines, handed to the sinks together at its end
    let sealed = std::cell::RefCell::new(Vec::new());
    let mut emit = |chain: &mut Chain, event: Event| {
        let line = match event {
            Event::Object(m) => chain.seal(m),
            Event::Members(mut m) => chain.seal_members(&mut m),
        };
        sealed.borrow_mut().push(line);
        events.inc();
    };
    let hand_over = || {
        let lines = std::mem::take(&mut *sealed.borrow_mut());
        if lines.is_empty() {
            return;
        }
        if let Some((last, others)) = sinks.split_last() {
            for sink in others {
                sink.push(lines.clone());
            }
            last.push(lines);
        }
    };
    let checkpoint = |chain: &mut Chain, emit: &mut dyn FnMut(&mut Chain, Event)| {
        let (head, seq) = chain.head();
        let (head, seq) = (head.to_owned(), seq);
        let cp = checkpoint::build(
            &chain_name,
            seq,
            &head,
            &clock::rfc3339(clock::now_micros()),
            &s.instance,
            s.signing_key.as_ref(),
        );
        let text = Value::Object(cp.clone()).to_string();
        if let Some(path) = &s.checkpoint_file
            && let Err(e) = append_lines(path, &[&text])
        {
            tracing::error!(file = %path.display(), error = %e, "cannot append the audit checkpoint");
        }
        if let Some(rt) = &runtime {
            for url in &s.anchor_webhooks {
                rt.spawn(anchor(url.clone(), text.clone()));
            }
        }
        emit(chain, cp.into());
    };
    let mut batch = Vec::new();
    loop {
        // the stop flag before the take: every event queued before `stop` is in this batch
        let stopping = inbox.stop.load(Ordering::Acquire);
        std::mem::swap(&mut *lock(&inbox.events), &mut batch);
        let busy = !batch.is_empty();
        for ev in batch.drain(..) {
            emit(&mut chain, ev);
        }
        if stopping {
            checkpoint(&mut chain, &mut emit);
            hand_over();
            break;
        }
        let now = clock::instant();
        if now >= next {
            if chain.head().1 > covered {
                checkpoint(&mut chain, &mut emit);
                covered = chain.head().1;
            }
            while next <= now {
                next += s.checkpoint_every;
            }
        }
        hand_over();
        if busy {
            // more are likely coming: let them gather
            std::thread::park_timeout(BATCH_WAIT);
            continue;
        }
        // nothing to do: sleep until the next checkpoint or an event (`record` wakes an idle
        // writer); look once more after saying so, or an event queued just before would wait
        inbox.idle.store(true, Ordering::Release);
        if lock(&inbox.events).is_empty() && !inbox.stop.load(Ordering::Acquire) {
            std::thread::park_timeout(next.saturating_duration_since(clock::instant()));
        }
        inbox.idle.store(false, Ordering::Release);
    }
    for sink in sinks {
        sink.close();
    }
}

/// `lines`, each followed by a newline, in one buffer (with room for `extra` more bytes).
fn newline_joined<L: AsRef<str>>(lines: &[L], extra: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(lines.iter().map(|l| l.as_ref().len() + 1).sum::<usize>() + extra);
    for l in lines {
        buf.extend_from_slice(l.as_ref().as_bytes());
        buf.push(b'\n');
    }
    buf
}

/// Appends `lines`, each with its newline, in one write, then `fdatasync`.
fn append_lines<L: AsRef<str>>(path: &Path, lines: &[L]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(&newline_joined(lines, 0))?;
    f.sync_data()
}

/// POSTs a checkpoint to an anchor, three tries with backoff; never blocks the writer.
async fn anchor(url: crate::https::Url, body: String) {
    let client = match crate::https::HttpsClient::new(None, Duration::from_secs(5), 64 * 1024) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the anchor client");
            return;
        }
    };
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=3 {
        match client.post_json(&url, body.clone()).await {
            Ok(r) if r.status.is_success() => return,
            Ok(r) => tracing::warn!(%url, status = r.status.as_u16(), attempt, "anchor webhook refused the checkpoint"),
            Err(e) => tracing::warn!(%url, error = %e, attempt, "anchor webhook failed"),
        }
        tokio::time::sleep(delay).await;
        delay *= 4;
    }
}

/// Where a sink writes.
trait Output: Send {
    fn write(&mut self, line: &str) -> std::io::Result<()>;
    /// Writes `lines` in order (one call each unless the output can do better). On an error,
    /// how many lines went out whole before it, so that a retry sends only the rest (a line
    /// sent twice would read as a replayed event to `audit verify`).
    fn write_batch(&mut self, lines: &[String]) -> Result<(), (usize, std::io::Error)> {
        for (i, l) in lines.iter().enumerate() {
            self.write(l).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// called when the queue is idle
    fn flush(&mut self) -> std::io::Result<()>;
}

struct Stdout;

impl Output for Stdout {
    fn write(&mut self, line: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

struct FileOut {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    fsync: Fsync,
    max_size: Option<u64>,
    dirty: bool,
    last_sync: std::time::Instant,
}

impl FileOut {
    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        self.file.as_mut().ok_or_else(|| std::io::Error::other("no file"))
    }

    /// Appends `buf`, `lines` whole lines, then syncs as `fsync` says. When a write fails part
    /// way, the file is cut back to its last whole line, so that the retry of a torn line never
    /// lands behind its first half (one line of neither, which `audit verify` would refuse).
    /// Err: the lines that went out whole, and the error.
    fn append(&mut self, buf: &[u8], lines: usize) -> Result<(), (usize, std::io::Error)> {
        self.open().map_err(|e| (0, e))?;
        let before = self.size;
        let always = self.fsync == Fsync::Always;
        let f = self.file.as_mut().ok_or_else(|| (0, std::io::Error::other("no file")))?;
        let (written, failed) = write_some(f, buf);
        if let Some(e) = failed {
            let whole = buf[..written].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if whole < written && f.set_len(before + whole as u64).is_err() {
                // not even that: reopened (and sized) at the next write
                self.file = None;
            }
            self.size = before + whole as u64;
            return Err((buf[..whole].iter().filter(|&&b| b == b'\n').count(), e));
        }
        if always {
            f.sync_data().map_err(|e| (lines, e))?;
        }
        self.size = before + buf.len() as u64;
        self.dirty = !always;
        if self.fsync == Fsync::Interval && self.last_sync.elapsed() >= Duration::from_secs(1) {
            // written; only the sync failed: nothing to write again
            self.flush().map_err(|e| (lines, e))?;
        }
        Ok(())
    }

    /// Renames the full file to `<path>.<UTC time>` and starts a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_all()?;
        }
        let stamp = clock::rfc3339(clock::now_micros()).replace(':', "");
        let mut target = PathBuf::from(format!("{}.{stamp}", self.path.display()));
        let mut n = 1;
        while target.exists() {
            target = PathBuf::from(format!("{}.{stamp}.{n}", self.path.display()));
            n += 1;
        }
        std::fs::rename(&self.path, &target)?;
        tracing::info!(file = %target.display(), "audit file rotated");
        Ok(())
    }
}

impl Output for FileOut {
    fn write(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if let Some(max) = self.max_size
            && self.size > 0
            && self.size + len > max
        {
            self.open()?;
            self.rotate()?;
        }
        self.append(&newline_joined(&[line], 0), 1).map_err(|(_, e)| e)
    }

    /// One `write` for the whole batch (then one `fdatasync` with `fsync: always`); line by
    /// line when the batch would cross `max_size`, so that rotation never splits a line.
    fn write_batch(&mut self, lines: &[String]) -> Result<(), (usize, std::io::Error)> {
        let len: u64 = lines.iter().map(|l| l.len() as u64 + 1).sum();
        // opened first: the size a rotation is decided by is the file's, from the first batch on
        self.open().map_err(|e| (0, e))?;
        if lines.len() < 2 || self.max_size.is_some_and(|max| self.size + len > max) {
            for (i, l) in lines.iter().enumerate() {
                self.write(l).map_err(|e| (i, e))?;
            }
            return Ok(());
        }
        self.append(&newline_joined(lines, 0), lines.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.dirty && self.fsync != Fsync::Never {
            if let Some(f) = self.file.as_mut() {
                f.sync_data()?;
            }
            self.dirty = false;
            self.last_sync = clock::instant();
        }
        Ok(())
    }
}

/// Writes `buf` to `f` until all of it is written or a write fails: the bytes written, and the
/// error if one ended it.
fn write_some(f: &mut File, buf: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut written = 0;
    while written < buf.len() {
        match f.write(&buf[written..]) {
            Ok(0) => return (written, Some(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Some(e)),
        }
    }
    (written, None)
}

struct RedisStreamOut {
    client: Option<redis::Client>,
    conn: Option<redis::Connection>,
    key: String,
    max_len: u64,
}

impl Output for RedisStreamOut {
    fn write(&mut self, line: &str) -> std::io::Result<()> {
        let err = |e: redis::RedisError| std::io::Error::other(e.to_string());
        if self.conn.is_none() {
            let client = self.client.as_ref().ok_or_else(|| std::io::Error::other("no Redis client"))?;
            self.conn = Some(connect(client).map_err(err)?);
        }
        let conn = self.conn.as_mut().ok_or_else(|| std::io::Error::other("no Redis connection"))?;
        let r: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(&self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("event")
            .arg(line)
            .query(conn);
        if let Err(e) = r {
            self.conn = None; // reconnect next time
            return Err(err(e));
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A synchronous Redis connection whose calls give up after 2 s (then the write is retried).
fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let timeout = Some(Duration::from_secs(2));
    let c = client.get_connection_with_timeout(Duration::from_secs(2))?;
    c.set_read_timeout(timeout)?;
    c.set_write_timeout(timeout)?;
    Ok(c)
}

fn output(s: &SinkSettings) -> std::io::Result<Box<dyn Output>> {
    Ok(match s {
        SinkSettings::Stdout => Box::new(Stdout),
        SinkSettings::File { path, fsync, max_size } => Box::new(FileOut {
            path: path.clone(),
            file: None,
            size: 0,
            fsync: *fsync,
            max_size: *max_size,
            dirty: false,
            last_sync: clock::instant(),
        }),
        SinkSettings::RedisStream { url, ca_file, key, max_len } => {
            let pem = ca_file.as_ref().map(std::fs::read).transpose()?;
            let client =
                crate::store::redis::client(url, pem.as_deref()).map_err(|e| std::io::Error::other(e.to_string()))?;
            Box::new(RedisStreamOut { client: Some(client), conn: None, key: key.clone(), max_len: *max_len })
        }
    })
}

/// Lines that wait on disk for a slow sink, oldest first.
struct Spill {
    path: PathBuf,
    /// true while lines are in the file: every new line then goes there too, behind them
    active: AtomicBool,
    lock: Mutex<()>,
    metrics: AuditMetrics,
}

impl Spill {
    /// Appends lines, in order, with one write and one `fdatasync`.
    fn append(&self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let n = lines.len() as u64;
        if let Err(e) = append_lines(&self.path, lines) {
            // the disk refuses too: nothing left to keep the events in
            self.metrics.dropped.inc_by(n);
            tracing::error!(file = %self.path.display(), error = %e, lines = n, "cannot spill audit events");
        } else {
            self.metrics.spilled.inc_by(n);
        }
    }
}

struct SinkHandle {
    name: &'static str,
    /// hand-overs of lines, in order; `None` asks the sink to drain and stop
    tx: SyncSender<Option<Vec<String>>>,
    /// lines handed over and not yet taken by the sink's thread, at most `queue`
    queued: Arc<AtomicUsize>,
    queue: usize,
    spill: Arc<Spill>,
    thread: JoinHandle<()>,
}

impl SinkHandle {
    fn start(
        s: SinkSettings,
        spill_path: PathBuf,
        queue: usize,
        metrics: &AuditMetrics,
    ) -> std::io::Result<SinkHandle> {
        let name = s.kind();
        let out = output(&s)?;
        // a spill file left by the last run is replayed first
        let left = std::fs::metadata(&spill_path).is_ok_and(|m| m.len() > 0);
        let spill = Arc::new(Spill {
            path: spill_path,
            active: AtomicBool::new(left),
            lock: Mutex::new(()),
            metrics: metrics.clone(),
        });
        // bounded in lines by `queued`; a hand-over holds one line or more, so this never fills first
        let (tx, rx) = sync_channel(queue.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let worker_spill = spill.clone();
        let taken = queued.clone();
        let thread = std::thread::Builder::new()
            .name(format!("audit-{name}"))
            .spawn(move || sink_loop(name, out, rx, &taken, worker_spill))?;
        Ok(SinkHandle { name, tx, queued, queue, spill, thread })
    }

    /// Hands lines to the sink in one go: as many as its queue has room for (`queue` lines),
    /// and the rest to its spill file, in order behind what is there (once lines are spilled,
    /// every later line goes there too until the sink has replayed them); all of them to the
    /// spill file when its thread is gone.
    fn push(&self, mut lines: Vec<String>) {
        let _guard = lock(&self.spill.lock);
        if !self.spill.active.load(Ordering::Acquire) {
            let room = self.queue.saturating_sub(self.queued.load(Ordering::Acquire));
            let rest = lines.split_off(lines.len().min(room));
            if !lines.is_empty() {
                let n = lines.len();
                self.queued.fetch_add(n, Ordering::AcqRel);
                lines = match self.tx.try_send(Some(lines)) {
                    Ok(()) => Vec::new(),
                    Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => {
                        self.queued.fetch_sub(n, Ordering::AcqRel);
                        back.unwrap_or_default()
                    }
                };
            }
            lines.extend(rest);
            if lines.is_empty() {
                return;
            }
            tracing::warn!(sink = self.name, lines = lines.len(), "audit sink is behind; spilling to disk");
            self.spill.active.store(true, Ordering::Release);
        }
        self.spill.append(&lines);
    }

    fn close(self) {
        let _ = self.tx.send(None);
        let _ = self.thread.join();
    }
}

/// Writes lines, retrying what has not gone out with backoff until all of it has, or
/// `deadline` (if any) passes: then `Err` with how many lines went out.
fn deliver(
    name: &str,
    out: &mut dyn Output,
    lines: &[String],
    deadline: Option<std::time::Instant>,
    errors: &Counter,
) -> Result<(), usize> {
    let mut delay = Duration::from_millis(50);
    let mut done = 0;
    loop {
        match out.write_batch(&lines[done..]) {
            Ok(()) => return Ok(()),
            Err((whole, e)) => {
                done = (done + whole).min(lines.len());
                errors.inc();
                tracing::warn!(sink = name, error = %e, "audit sink write failed; retrying");
                if deadline.is_some_and(|d| clock::instant() >= d) {
                    return Err(done);
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn sink_loop(
    name: &'static str,
    mut out: Box<dyn Output>,
    rx: Receiver<Option<Vec<String>>>,
    queued: &AtomicUsize,
    spill: Arc<Spill>,
) {
    let take = |lines: Vec<String>, batch: &mut Vec<String>| {
        queued.fetch_sub(lines.len(), Ordering::AcqRel);
        batch.extend(lines);
    };
    let mut batch = Vec::with_capacity(SINK_BATCH);
    let mut offset = 0u64;
    let mut deadline = None;
    let mut stopping = false;
    loop {
        // the queue first: what is in it is older than anything spilled since
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(lines)) => {
                // what else is queued goes in the same write (a stop marker ends the batch)
                take(lines, &mut batch);
                let mut stop_seen = false;
                while batch.len() < SINK_BATCH {
                    match rx.try_recv() {
                        Ok(Some(l)) => take(l, &mut batch),
                        Ok(None) => {
                            stop_seen = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if stop_seen {
                    // stopping: this batch, too, is given up at the drain deadline
                    stopping = true;
                    deadline = Some(clock::instant() + DRAIN_DEADLINE);
                }
                if let Err(done) = deliver(name, out.as_mut(), &batch, deadline, &spill.metrics.sink_errors) {
                    // the drain deadline passed with the sink still failing: keep the lines not
                    // delivered and everything after them, in order, for the next start
                    let mut pending = batch.split_off(done);
                    while let Ok(Some(l)) = rx.try_recv() {
                        take(l, &mut pending);
                    }
                    keep_for_next_start(&spill, offset, &pending);
                    return;
                }
                batch.clear();
                if !stop_seen {
                    continue;
                }
            }
            Ok(None) => {
                stopping = true;
                deadline = Some(clock::instant() + DRAIN_DEADLINE);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => stopping = true,
        }
        if spill.active.load(Ordering::Acquire) {
            offset = replay(name, out.as_mut(), &spill, offset, deadline);
        }
        let _ = out.flush();
        if stopping && rx.try_recv().is_err() {
            if !spill.active.load(Ordering::Acquire) {
                return;
            }
            if deadline.is_some_and(|d| clock::instant() >= d) {
                keep_for_next_start(&spill, offset, &[]);
                return;
            }
        }
    }
}

/// Rewrites the spill file as `pending` (older) followed by what is left of it after `offset`,
/// so the next start replays exactly what was not delivered, in order.
fn keep_for_next_start(spill: &Spill, offset: u64, pending: &[String]) {
    let _guard = lock(&spill.lock);
    let rest = std::fs::read(&spill.path).unwrap_or_default();
    let rest = rest.get(usize::try_from(offset).unwrap_or(usize::MAX)..).unwrap_or_default();
    let mut text = newline_joined(pending, rest.len());
    text.extend_from_slice(rest);
    let tmp = spill.path.with_extension("spill.tmp");
    let ok = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &spill.path));
    match ok {
        Ok(()) => {
            tracing::error!(file = %spill.path.display(), lines = pending.len(), "audit sink still failing at shutdown: its events wait in the spill file for the next start")
        }
        Err(e) => {
            tracing::error!(file = %spill.path.display(), error = %e, "audit events could not be kept for the next start")
        }
    }
}

/// Delivers spilled lines from `offset`; once caught up, empties the file and ends spilling.
/// Returns the offset reached.
fn replay(
    name: &str,
    out: &mut dyn Output,
    spill: &Spill,
    mut offset: u64,
    deadline: Option<std::time::Instant>,
) -> u64 {
    let Ok(mut f) = File::open(&spill.path) else { return offset };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return offset;
    }
    let mut reader = BufReader::new(f);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                // caught up: under the lock, so that no line is appended between this check and
                // the end of spilling
                let _guard = lock(&spill.lock);
                let len = std::fs::metadata(&spill.path).map_or(0, |m| m.len());
                if len <= offset {
                    let _ = File::create(&spill.path); // truncate
                    spill.active.store(false, Ordering::Release);
                    return 0;
                }
                return offset; // more arrived: the next round reads it
            }
            Ok(n) if line.ends_with('\n') => {
                let one = [line.trim_end_matches('\n').to_owned()];
                if deliver(name, out, &one, deadline, &spill.metrics.sink_errors).is_err() {
                    return offset; // left in the file for the next start
                }
                offset += n as u64;
            }
            // a partial last line (being appended right now): read it next round
            Ok(_) | Err(_) => return offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes lines until `down_at` of them are in, then fails `failures` times.
    struct Flaky {
        got: Vec<String>,
        down_at: usize,
        failures: usize,
    }

    impl Output for Flaky {
        fn write(&mut self, line: &str) -> std::io::Result<()> {
            if self.got.len() == self.down_at && self.failures > 0 {
                self.failures -= 1;
                return Err(std::io::Error::other("down"));
            }
            self.got.push(line.to_owned());
            Ok(())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_retried_after_a_failure_sends_each_line_once() {
        let lines: Vec<String> = (0..6).map(|i| format!("line {i}")).collect();
        let errors = Counter::default();
        let mut out = Flaky { got: Vec::new(), down_at: 2, failures: 1 };
        assert_eq!(deliver("t", &mut out, &lines, None, &errors), Ok(()));
        assert_eq!(out.got, lines, "lines 0 and 1 are not written twice");
        assert_eq!(errors.get(), 1);
        // still failing at the drain deadline: how many went out, so the rest is kept
        let mut out = Flaky { got: Vec::new(), down_at: 4, failures: usize::MAX };
        assert_eq!(deliver("t", &mut out, &lines, Some(clock::instant()), &errors), Err(4));
    }

    #[test]
    fn a_full_file_is_rotated_and_no_line_is_split() {
        let dir = std::env::temp_dir().join(format!("portcullis-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.log");
        let mut out = FileOut {
            path: path.clone(),
            file: None,
            size: 0,
            fsync: Fsync::Always,
            max_size: Some(100),
            dirty: false,
            last_sync: clock::instant(),
        };
        let lines: Vec<String> = (0..10).map(|i| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(20))).collect();
        for l in &lines {
            out.write(l).expect("write");
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("ls").map(|e| e.expect("entry").path()).collect();
        files.sort();
        assert!(files.len() >= 3, "rotated: {files:?}");
        let mut seen = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).expect("read");
            assert!(text.len() <= 100, "{} holds {} bytes", f.display(), text.len());
            seen.extend(text.lines().map(str::to_owned));
        }
        seen.sort();
        let mut want = lines.clone();
        want.sort();
        assert_eq!(seen, want, "every line whole, in one file or another");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_hand_over_past_the_queue_sends_what_fits_and_spills_the_rest_in_order() {
        let dir = std::env::temp_dir().join(format!("portcullis-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let metrics = AuditMetrics::default();
        let spill = Arc::new(Spill {
            path: dir.join("sink.spill"),
            active: AtomicBool::new(false),
            lock: Mutex::new(()),
            metrics: metrics.clone(),
        });
        // a sink whose thread takes nothing: its queue holds 3 lines
        let (tx, rx) = sync_channel(3);
        let sink = SinkHandle {
            name: "test",
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            queue: 3,
            spill: spill.clone(),
            thread: std::thread::spawn(|| {}),
        };
        let lines = |r: std::ops::Range<usize>| r.map(|i| format!("line {i}")).collect::<Vec<_>>();
        sink.push(lines(0..2));
        sink.push(lines(2..6));
        // behind the spilled ones, even though nothing was taken from the queue since
        sink.push(lines(6..7));
        let queued: Vec<String> = rx.try_iter().flatten().flatten().collect();
        assert_eq!(queued, lines(0..3), "what fitted went to the queue, in order");
        let spilled = std::fs::read_to_string(dir.join("sink.spill")).expect("spill file");
        assert_eq!(spilled, lines(3..7).join("\n") + "\n", "the rest, in order, each line once");
        assert_eq!(metrics.spilled.get(), 4);
        assert_eq!(metrics.dropped.get(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
