//! The Raft log and vote on disk.
//!
//! Owns: durability of log entries and the vote. An append is reported to
//! openraft as flushed only after `fdatasync` returns, so nothing is
//! acknowledged before it is on disk. One writer thread drains every pending
//! request before each sync, so concurrent writes share one fsync (group
//! commit).
//!
//! Format: `log/seg-NNNNNNNNNNNNNNNNNNNN.log` segments of records
//! `[len: u32 LE][crc32: u32 LE][postcard(Record)]`. The log is logical:
//! truncations and purges are records too, replayed in order at start-up.
//! A torn record at the tail of the last segment (a crash mid-write, never
//! acknowledged) is cut off; a bad record anywhere else refuses start-up.
//! The vote lives in `vote` (written to a temp file, fsynced, renamed).
//!
//! Must never: report an append flushed before it is synced, or read a
//! segment it cannot verify.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use serde::{Deserialize, Serialize};

use super::types::{Entry, LogId, TypeConfig, Vote};

const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const MAX_RECORD: usize = 256 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
enum Record {
    Entry(Entry),
    TruncateAfter(Option<u64>),
    Purge(LogId),
}

#[derive(Default)]
struct Mem {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
}

enum WriterCmd {
    Append(Vec<u8>, IOFlushed<TypeConfig>),
    Control(Vec<u8>, Option<mpsc::Sender<io::Result<()>>>),
    PurgeSegments(u64),
}

struct Shared {
    mem: Mutex<Mem>,
    dir: PathBuf,
    tx: Mutex<mpsc::Sender<WriterCmd>>,
}

/// The log store handed to openraft; clones share one log.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

fn lock(m: &Mutex<Mem>) -> MutexGuard<'_, Mem> {
    // A poisoned lock means a panic mid-update; the data is still the last
    // consistent state we wrote, so keep serving it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn encode(rec: &Record) -> io::Result<Vec<u8>> {
    encode_checked(rec)
}

fn segment_name(seq: u64) -> String {
    format!("seg-{seq:020}.log")
}

fn parse_segment(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// Syncs a directory so renames and new files in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

struct Segment {
    seq: u64,
    max_index: Option<u64>,
}

impl LogStore {
    /// Opens (or creates) the log under `dir`, replaying every segment.
    pub fn open(dir: &Path, metrics: crate::metrics::Metrics) -> io::Result<LogStore> {
        fs::create_dir_all(dir)?;
        let mut mem = Mem::default();
        let vote_path = dir.join("vote");
        if vote_path.exists() {
            let bytes = fs::read(&vote_path)?;
            mem.vote =
                Some(decode_checked(&bytes).map_err(|e| {
                    io::Error::new(e.kind(), format!("{}: {e}", vote_path.display()))
                })?);
        }
        let mut seqs: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| parse_segment(&e.file_name().to_string_lossy()))
            .collect();
        seqs.sort_unstable();
        let mut segments = Vec::new();
        for (i, seq) in seqs.iter().enumerate() {
            let last = i + 1 == seqs.len();
            let path = dir.join(segment_name(*seq));
            let max_index = replay_segment(&path, last, &mut mem)?;
            segments.push(Segment {
                seq: *seq,
                max_index,
            });
        }
        let next_seq = seqs.last().map_or(1, |s| s + 1);
        let active = open_segment(dir, next_seq)?;
        sync_dir(dir)?;
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            file: active,
            written: 0,
            segments,
            active_seq: next_seq,
            active_max: None,
            last_purged: mem.last_purged,
            metrics,
        };
        if let Some(p) = mem.last_purged {
            // Keep the purge point in the newest segment so old ones can go.
            writer.write(&encode(&Record::Purge(p))?)?;
        }
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("lockd-log-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                mem: Mutex::new(mem),
                dir: dir.to_path_buf(),
                tx: Mutex::new(tx),
            }),
        })
    }

    fn send(&self, cmd: WriterCmd) -> io::Result<()> {
        let tx = self.shared.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.send(cmd)
            .map_err(|_| io::Error::other("log writer thread has stopped"))
    }

    fn control(&self, rec: &Record, wait: bool) -> io::Result<()> {
        let bytes = encode(rec)?;
        if wait {
            let (tx, rx) = mpsc::channel();
            self.send(WriterCmd::Control(bytes, Some(tx)))?;
            rx.recv()
                .map_err(|_| io::Error::other("log writer thread has stopped"))?
        } else {
            self.send(WriterCmd::Control(bytes, None))
        }
    }
}

fn decode_checked<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(checked_payload(bytes)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Verifies a frame written by [`encode_checked`] and returns its payload.
pub fn checked_payload(bytes: &[u8]) -> io::Result<&[u8]> {
    frame_payload(bytes).map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))
}

/// Encodes a value with the length+checksum framing used on disk.
pub fn encode_checked<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    let payload = postcard::to_stdvec(v).map_err(io::Error::other)?;
    let mut buf = Vec::with_capacity(payload.len() + 8);
    let len = u32::try_from(payload.len()).map_err(io::Error::other)?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    Ok(buf)
}

/// Decodes a value framed by [`encode_checked`].
pub fn decode_framed<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> io::Result<T> {
    decode_checked(bytes)
}

fn replay_segment(path: &Path, last: bool, mem: &mut Mem) -> io::Result<Option<u64>> {
    let file = File::open(path)?;
    let total = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut offset: u64 = 0;
    let mut max_index = None;
    while offset < total {
        let torn = match read_record(&mut r) {
            Ok((len, payload)) => {
                let rec: Record = postcard::from_bytes(&payload).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} at offset {offset}: {e}", path.display()),
                    )
                })?;
                match rec {
                    Record::Entry(e) => {
                        let idx = e.log_id.index;
                        max_index = Some(max_index.map_or(idx, |m: u64| m.max(idx)));
                        mem.entries.insert(idx, e);
                    }
                    Record::TruncateAfter(after) => {
                        let from = after.map_or(0, |a| a + 1);
                        mem.entries.split_off(&from);
                    }
                    Record::Purge(id) => {
                        mem.entries = mem.entries.split_off(&(id.index + 1));
                        if mem.last_purged.is_none_or(|p| p.index < id.index) {
                            mem.last_purged = Some(id);
                        }
                    }
                }
                offset += 8 + len as u64;
                continue;
            }
            Err(why) => why,
        };
        if !last {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {torn} at offset {offset} in a sealed segment; the log is corrupt",
                    path.display()
                ),
            ));
        }
        // The tail of the newest segment was being written when the process
        // died; it was never synced, so never acknowledged. Cut it off.
        tracing::warn!(path = %path.display(), offset, why = torn, "cutting torn tail off the log");
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(offset)?;
        f.sync_all()?;
        break;
    }
    Ok(max_index)
}

/// Reads one framed record; Err names why the bytes are not a whole record.
fn read_record(r: &mut impl Read) -> Result<(usize, Vec<u8>), &'static str> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header).map_err(|_| "partial header")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Err("record length out of range");
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|_| "partial record")?;
    if crc32fast::hash(&payload) != crc {
        return Err("checksum mismatch");
    }
    Ok((len, payload))
}

/// Checks the frame at the start of an in-memory buffer and returns its
/// payload without copying it.
fn frame_payload(bytes: &[u8]) -> Result<&[u8], &'static str> {
    if bytes.len() < 8 {
        return Err("partial header");
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let payload = bytes.get(8..8 + len).ok_or("partial record")?;
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch");
    }
    Ok(payload)
}

fn open_segment(dir: &Path, seq: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(segment_name(seq)))
}

struct Writer {
    dir: PathBuf,
    file: File,
    written: u64,
    segments: Vec<Segment>,
    active_seq: u64,
    active_max: Option<u64>,
    last_purged: Option<LogId>,
    metrics: crate::metrics::Metrics,
}

impl Writer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn run(mut self, rx: mpsc::Receiver<WriterCmd>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut result = Ok(());
            let mut purge_to = None;
            for cmd in &batch {
                let r = match cmd {
                    WriterCmd::Append(bytes, _) | WriterCmd::Control(bytes, _) => {
                        self.note_indexes(bytes);
                        self.write(bytes)
                    }
                    WriterCmd::PurgeSegments(upto) => {
                        purge_to = Some(*upto);
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    result = Err(e);
                    break;
                }
            }
            if result.is_ok() {
                let started = std::time::Instant::now();
                result = self.file.sync_data();
                self.metrics.observe_fsync(started.elapsed(), batch.len());
            }
            let failed = result.is_err();
            for cmd in batch {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                match cmd {
                    WriterCmd::Append(_, cb) => cb.io_completed(r),
                    WriterCmd::Control(_, Some(done)) => {
                        let _ = done.send(r);
                    }
                    WriterCmd::Control(_, None) | WriterCmd::PurgeSegments(_) => {}
                }
            }
            if failed {
                // A failed fsync leaves the file in an unknown state; refuse
                // everything after it rather than acknowledge on top of it.
                tracing::error!("log fsync failed; the log writer stops");
                return;
            }
            if let Some(upto) = purge_to {
                self.remove_purged(upto);
            }
            if self.written >= SEGMENT_BYTES {
                if let Err(e) = self.rotate() {
                    tracing::error!(error = %e, "log segment rotation failed; the log writer stops");
                    return;
                }
            }
        }
    }

    fn note_indexes(&mut self, bytes: &[u8]) {
        // Track the highest entry index per segment so purged segments can be
        // deleted. Records are decoded from what we are about to write.
        let mut off = 0usize;
        while off + 8 <= bytes.len() {
            let len =
                u32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
                    as usize;
            if let Some(payload) = bytes.get(off + 8..off + 8 + len) {
                match postcard::from_bytes::<Record>(payload) {
                    Ok(Record::Entry(e)) => {
                        let i = e.log_id.index;
                        self.active_max = Some(self.active_max.map_or(i, |m| m.max(i)));
                    }
                    Ok(Record::Purge(id)) => self.last_purged = Some(id),
                    _ => {}
                }
            }
            off += 8 + len;
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.segments.push(Segment {
            seq: self.active_seq,
            max_index: self.active_max,
        });
        self.active_seq += 1;
        self.file = open_segment(&self.dir, self.active_seq)?;
        self.written = 0;
        self.active_max = None;
        sync_dir(&self.dir)?;
        if let Some(p) = self.last_purged {
            self.write(&encode(&Record::Purge(p))?)?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn remove_purged(&mut self, upto: u64) {
        let dir = self.dir.clone();
        self.segments.retain(|s| {
            let gone = s.max_index.is_none_or(|m| m <= upto);
            if gone {
                if let Err(e) = fs::remove_file(dir.join(segment_name(s.seq))) {
                    tracing::warn!(error = %e, seq = s.seq, "could not remove purged log segment");
                    return true;
                }
            }
            !gone
        });
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let mem = lock(&self.shared.mem);
        Ok(mem.entries.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.shared.mem).vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = lock(&self.shared.mem);
        let last = mem.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: last.or(mem.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = encode_checked(vote)?;
        write_atomic(&self.shared.dir.join("vote"), &bytes)?;
        lock(&self.shared.mem).vote = Some(*vote);
        Ok(())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut bytes = Vec::new();
        {
            let mut mem = lock(&self.shared.mem);
            for e in entries {
                bytes.extend_from_slice(&encode(&Record::Entry(e.clone()))?);
                mem.entries.insert(e.log_id.index, e);
            }
        }
        // Entries are readable at once (for replication); openraft counts
        // them as durable only when the writer calls back after fsync.
        self.send(WriterCmd::Append(bytes, callback))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let after = last_log_id.map(|l| l.index);
        {
            let mut mem = lock(&self.shared.mem);
            let from = after.map_or(0, |a| a + 1);
            mem.entries.split_off(&from);
        }
        self.control(&Record::TruncateAfter(after), true)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        {
            let mut mem = lock(&self.shared.mem);
            mem.entries = mem.entries.split_off(&(log_id.index + 1));
            mem.last_purged = Some(log_id);
        }
        self.control(&Record::Purge(log_id), false)?;
        self.send(WriterCmd::PurgeSegments(log_id.index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::entry::RaftEntry;
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderId;

    fn entry(term: u64, index: u64) -> Entry {
        let lid = openraft::impls::leader_id_adv::LeaderId::<u64, u64>::new(term, 1).to_committed();
        Entry::new_blank(LogId::new(lid, index))
    }

    async fn append_sync(store: &mut LogStore, entries: Vec<Entry>) {
        let (tx, rx) = TypeConfig::oneshot();
        store
            .append(entries, IOFlushed::signal(tx))
            .await
            .expect("append");
        rx.await.expect("callback").expect("flushed");
    }

    #[tokio::test]
    async fn entries_truncation_purge_and_vote_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = crate::metrics::Metrics::new();
        {
            let mut s = LogStore::open(dir.path(), m.clone()).expect("open");
            append_sync(&mut s, (1..=10).map(|i| entry(1, i)).collect()).await;
            s.truncate_after(Some(entry(1, 7).log_id))
                .await
                .expect("truncate");
            append_sync(&mut s, vec![entry(2, 8), entry(2, 9)]).await;
            s.purge(entry(1, 3).log_id).await.expect("purge");
            s.save_vote(&Vote::new(2, 1)).await.expect("vote");
            append_sync(&mut s, vec![entry(2, 10)]).await;
        }
        let mut s = LogStore::open(dir.path(), m).expect("reopen");
        let st = s.get_log_state().await.expect("state");
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(3));
        assert_eq!(st.last_log_id, Some(entry(2, 10).log_id));
        let got = s.try_get_log_entries(0..100).await.expect("read");
        let ids: Vec<_> = got
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect();
        assert_eq!(
            ids,
            vec![(1, 4), (1, 5), (1, 6), (1, 7), (2, 8), (2, 9), (2, 10)]
        );
        assert_eq!(s.read_vote().await.expect("vote"), Some(Vote::new(2, 1)));
    }

    #[tokio::test]
    async fn torn_tail_is_cut_and_earlier_entries_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = crate::metrics::Metrics::new();
        {
            let mut s = LogStore::open(dir.path(), m.clone()).expect("open");
            append_sync(&mut s, (1..=5).map(|i| entry(1, i)).collect()).await;
        }
        // Simulate a crash halfway through writing a record.
        let seg = dir.path().join(segment_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).expect("seg");
        f.write_all(&[200, 0, 0, 0, 1, 2]).expect("garbage");
        drop(f);
        let mut s = LogStore::open(dir.path(), m).expect("reopen");
        let got = s.try_get_log_entries(0..100).await.expect("read");
        assert_eq!(got.len(), 5);
    }

    #[tokio::test]
    async fn corruption_in_a_sealed_segment_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = crate::metrics::Metrics::new();
        {
            let mut s = LogStore::open(dir.path(), m.clone()).expect("open");
            append_sync(&mut s, (1..=5).map(|i| entry(1, i)).collect()).await;
        }
        // Reopening seals segment 1 and starts segment 2.
        drop(LogStore::open(dir.path(), m.clone()).expect("reopen"));
        let seg = dir.path().join(segment_name(1));
        let mut bytes = fs::read(&seg).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&seg, bytes).expect("write");
        let err = LogStore::open(dir.path(), m).err().expect("must refuse");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
