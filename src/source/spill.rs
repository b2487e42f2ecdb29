//! A transaction being received, kept in memory up to a budget and spilled to
//! a temporary file beyond it, so that a transaction of millions of changes
//! (protocol v1 sends it whole at commit; v2 streams it in chunks before it
//! commits) never holds more than the budget in memory.
//!
//! Changes of subtransactions that abort (protocol v2 Stream Abort with a
//! subtransaction id) are dropped when the buffer is read back.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use crate::event::ChangeEvent;

/// Spill files of `source` are named `tributary-txn-<source>-<random>.jsonl`
/// (source names never hold a `-`, so one source's prefix is no other's).
fn prefix(source: &str) -> String {
    format!("tributary-txn-{source}-")
}

fn ev_source(mem: &[ChangeEvent]) -> String {
    mem.first().map(|e| e.source.clone()).unwrap_or_default()
}

/// Removes the spill files `source` left in `dir` (a run killed while it held a
/// large transaction leaves its file behind; the transaction is received
/// again). Call before the source's stream starts, when it holds none. Returns
/// how many were removed.
pub fn remove_stale(dir: &Path, source: &str) -> std::io::Result<usize> {
    let prefix = prefix(source);
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".jsonl") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Buffer of one transaction's changes.
#[derive(Debug)]
pub struct TxnBuffer {
    mem: Vec<ChangeEvent>,
    mem_bytes: usize,
    budget: usize,
    file: Option<(tempfile::NamedTempFile, BufWriter<File>)>,
    len: usize,
    aborted: HashSet<u32>,
}

/// Rough in-memory size of an event: enough to keep the budget honest.
fn approx_size(e: &ChangeEvent) -> usize {
    fn value(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => 32 + s.len(),
            serde_json::Value::Array(a) => 32 + a.iter().map(value).sum::<usize>(),
            serde_json::Value::Object(o) => {
                48 + o
                    .iter()
                    .map(|(k, v)| 32 + k.len() + value(v))
                    .sum::<usize>()
            }
            _ => 16,
        }
    }
    let map = |m: &serde_json::Map<String, serde_json::Value>| {
        m.iter()
            .map(|(k, v)| 48 + k.len() + value(v))
            .sum::<usize>()
    };
    256 + e.source.len()
        + e.table.len()
        + map(&e.key)
        + map(&e.row)
        + e.unchanged.iter().map(|u| 24 + u.len()).sum::<usize>()
}

impl TxnBuffer {
    /// An empty buffer that spills past `budget` bytes.
    pub fn new(budget: usize) -> TxnBuffer {
        TxnBuffer {
            mem: Vec::new(),
            mem_bytes: 0,
            budget,
            file: None,
            len: 0,
            aborted: HashSet::new(),
        }
    }

    /// Changes buffered (including those of aborted subtransactions).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Spilled to disk?
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Adds a change; spills everything to `dir` once the budget is exceeded.
    pub fn push(&mut self, ev: ChangeEvent, dir: &Path) -> std::io::Result<()> {
        self.len += 1;
        if let Some((_, w)) = &mut self.file {
            serde_json::to_writer(&mut *w, &ev)?;
            return w.write_all(b"\n");
        }
        self.mem_bytes += approx_size(&ev);
        self.mem.push(ev);
        if self.mem_bytes > self.budget {
            let tmp = tempfile::Builder::new()
                .prefix(&prefix(&ev_source(&self.mem)))
                .suffix(".jsonl")
                .tempfile_in(dir)?;
            let mut w = BufWriter::with_capacity(1 << 20, tmp.reopen()?);
            for e in self.mem.drain(..) {
                serde_json::to_writer(&mut w, &e)?;
                w.write_all(b"\n")?;
            }
            self.mem_bytes = 0;
            self.mem.shrink_to_fit();
            tracing::debug!(changes = self.len, path = %tmp.path().display(), "large transaction spilled to disk");
            self.file = Some((tmp, w));
        }
        Ok(())
    }

    /// Drops the changes of an aborted subtransaction (when read back).
    pub fn abort_subtransaction(&mut self, subxid: u32) {
        self.aborted.insert(subxid);
    }

    /// Reads the changes back in order, `chunk` at a time, without the aborted
    /// subtransactions'. The temporary file is removed when the reader is dropped.
    pub fn into_chunks(self, chunk: usize) -> std::io::Result<Chunks> {
        let source = match self.file {
            None => Source::Mem(self.mem.into_iter()),
            Some((tmp, mut w)) => {
                w.flush()?;
                drop(w);
                let reader = BufReader::with_capacity(1 << 20, tmp.reopen()?);
                Source::File {
                    _tmp: tmp,
                    lines: reader.lines(),
                }
            }
        };
        Ok(Chunks {
            source,
            chunk: chunk.max(1),
            aborted: self.aborted,
        })
    }
}

enum Source {
    Mem(std::vec::IntoIter<ChangeEvent>),
    File {
        _tmp: tempfile::NamedTempFile,
        lines: std::io::Lines<BufReader<File>>,
    },
}

/// Reads a buffered transaction back in chunks.
pub struct Chunks {
    source: Source,
    chunk: usize,
    aborted: HashSet<u32>,
}

impl Chunks {
    /// The next chunk (empty when done).
    pub fn next_chunk(&mut self) -> std::io::Result<Vec<ChangeEvent>> {
        let mut out = Vec::with_capacity(self.chunk.min(65_536));
        while out.len() < self.chunk {
            let ev = match &mut self.source {
                Source::Mem(it) => match it.next() {
                    Some(e) => e,
                    None => break,
                },
                Source::File { lines, .. } => match lines.next() {
                    Some(line) => serde_json::from_str(&line?).map_err(std::io::Error::other)?,
                    None => break,
                },
            };
            if !self.aborted.contains(&ev.xid) {
                out.push(ev);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;

    use super::*;
    use crate::event::{Lsn, Op};

    fn ev(i: u64, xid: u32) -> ChangeEvent {
        ChangeEvent {
            source: "s".into(),
            table: "public.t".into(),
            op: Op::Insert,
            key: json!({"id": i}).as_object().unwrap().clone(),
            row: json!({"id": i, "pad": "x".repeat(100)})
                .as_object()
                .unwrap()
                .clone(),
            unchanged: vec![],
            unreadable: Vec::new(),
            lsn: Lsn(i),
            commit_lsn: Lsn::ZERO,
            seq: i,
            xid,
            commit_time: Utc::now(),
        }
    }

    #[test]
    fn spills_past_the_budget_and_reads_back_in_order_without_aborted_subxacts() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = TxnBuffer::new(10_000);
        for i in 0..1000 {
            b.push(
                ev(i, if (300..400).contains(&i) { 7 } else { 1 }),
                dir.path(),
            )
            .unwrap();
        }
        assert!(b.spilled());
        assert_eq!(b.len(), 1000);
        b.abort_subtransaction(7);
        let mut chunks = b.into_chunks(256).unwrap();
        let mut all = Vec::new();
        loop {
            let c = chunks.next_chunk().unwrap();
            if c.is_empty() {
                break;
            }
            assert!(c.len() <= 256);
            all.extend(c);
        }
        let ids: Vec<u64> = all.iter().map(|e| e.seq).collect();
        let want: Vec<u64> = (0..1000).filter(|i| !(300..400).contains(i)).collect();
        assert_eq!(ids, want);
        drop(chunks);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the spill file is removed"
        );
    }

    #[test]
    fn small_transactions_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = TxnBuffer::new(1 << 20);
        for i in 0..10 {
            b.push(ev(i, 1), dir.path()).unwrap();
        }
        assert!(!b.spilled());
        assert_eq!(b.into_chunks(100).unwrap().next_chunk().unwrap().len(), 10);
    }
}
