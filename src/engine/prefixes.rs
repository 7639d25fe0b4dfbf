//! The prefix cache of the batched engine: finished sequences' key/value caches, kept (up to a
//! byte budget and a number of entries) so that a later prompt starting with the same tokens —
//! the system prompt, or the same conversation one turn later — continues from them. Entries
//! share whole blocks of the paged store with the sequences continuing from them, and give
//! blocks back, oldest first, whenever a running sequence needs room.

use super::decoder::{KvPool, SeqCache};

/// A shared prefix shorter than this is not worth looking up.
pub(super) const MIN_PREFIX: usize = 8;
/// Finished sequences kept for their prefix.
const PREFIX_ENTRIES: usize = 16;

/// Finished sequences' caches, looked up by their tokens.
pub(super) struct Prefixes {
    entries: Vec<(Vec<u32>, SeqCache, u64)>,
    clock: u64,
    max_bytes: usize,
    block_bytes: usize,
}

impl Prefixes {
    /// The longest cached prefix of `prompt` (leaving at least its last token to run).
    pub(super) fn lookup(&mut self, pool: &KvPool, prompt: &[u32]) -> Option<SeqCache> {
        let limit = prompt.len().saturating_sub(1);
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (t, _, _))| {
                let common = t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (i, common.min(limit))
            })
            .max_by_key(|(_, n)| *n)?;
        if n < MIN_PREFIX {
            return None;
        }
        self.clock += 1;
        self.entries[i].2 = self.clock;
        // No free block for a partial last block: start from nothing rather than fail.
        pool.share(&self.entries[i].1, n).ok()
    }

    pub(super) fn insert(&mut self, tokens: Vec<u32>, cache: SeqCache) {
        if tokens.len() < MIN_PREFIX || cache.len() != tokens.len() {
            return;
        }
        // An entry that is a prefix of the new one adds nothing.
        self.entries
            .retain(|(t, _, _)| !(t.len() <= tokens.len() && tokens[..t.len()] == t[..]));
        self.clock += 1;
        self.entries.push((tokens, cache, self.clock));
        while self.entries.len() > PREFIX_ENTRIES || self.bytes() > self.max_bytes {
            if !self.evict_oldest() {
                break;
            }
        }
    }

    /// Drops the least recently used entry (its blocks go back to the store unless a running
    /// sequence shares them); false when there is none.
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.2)
            .map(|(i, _)| i);
        match oldest {
            Some(i) => {
                self.entries.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Frees blocks held only by the prefix cache until `need` blocks are free (or it is empty).
    pub(super) fn make_room(&mut self, pool: &KvPool, need: usize) {
        while pool.free_blocks() < need && self.evict_oldest() {}
    }

    fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.1.blocks() * self.block_bytes)
            .sum()
    }
}

impl Prefixes {
    /// An empty cache holding at most `max_bytes` of blocks of `block_bytes`.
    pub(super) fn new(max_bytes: usize, block_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            clock: 0,
            max_bytes,
            block_bytes,
        }
    }
}
