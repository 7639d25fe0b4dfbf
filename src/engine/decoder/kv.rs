//! The paged key/value store: blocks of positions shared by reference count, each sequence's
//! list of blocks, and the plan of where a step writes and reads.

use candle_core::{DType, Result, Tensor};

use super::Decoder;

/// Visible key columns per (sequence, query position): every layer's, and the sliding-window
/// layers' where the window hides more.
pub(super) type ChunkRanges = (Vec<(usize, usize)>, Option<Vec<(usize, usize)>>);

/// Positions per block of the paged key/value store.
pub const KV_BLOCK: usize = 16;

/// Which blocks of a `KvPool` are in use, and by how many caches (a block of a shared prefix
/// belongs to the prefix cache and to every sequence continuing from it).
pub(super) struct BlockTable {
    pub(super) refs: Vec<u32>,
    pub(super) free: Vec<u32>,
}

pub(super) type Blocks = std::sync::Arc<std::sync::Mutex<BlockTable>>;

pub(super) fn lock(b: &Blocks) -> std::sync::MutexGuard<'_, BlockTable> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// The keys and values of every sequence a decoder runs, in blocks of `KV_BLOCK` positions (a
/// paged cache): per layer one key and one value tensor of shape
/// (kv heads, blocks × KV_BLOCK, head dim). A batched step writes the new positions of all its
/// sequences with one scatter and reads them back with one gather, so attention runs for the whole
/// batch at once; the memory in use is what the sequences hold, rounded up to a block each.
pub struct KvPool {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) blocks: Blocks,
    pub(super) block_bytes: usize,
}

impl KvPool {
    /// Blocks not held by any cache.
    pub fn free_blocks(&self) -> usize {
        lock(&self.blocks).free.len()
    }

    /// Bytes of one block (keys and values of every layer).
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Blocks the caches still need to take `t` more positions each.
    pub fn blocks_needed(caches: &[&mut SeqCache], t: usize) -> usize {
        caches.iter().map(|c| c.blocks_short(t)).sum()
    }

    pub(super) fn grow(&self, cache: &mut SeqCache, positions: usize) -> Result<()> {
        match &cache.owner {
            Some(o) if !std::sync::Arc::ptr_eq(o, &self.blocks) => {
                candle_core::bail!("a cache used with another key/value store")
            }
            Some(_) => {}
            None => cache.owner = Some(self.blocks.clone()),
        }
        let mut table = lock(&self.blocks);
        while cache.blocks.len() * KV_BLOCK < positions {
            let Some(b) = table.free.pop() else {
                candle_core::bail!("the key/value cache is full");
            };
            table.refs[b as usize] = 1;
            cache.blocks.push(b);
        }
        Ok(())
    }

    /// A cache holding the first `n` positions of `cache`: whole blocks are shared (they are never
    /// written again: a sequence only writes past its own length), a last partial block is copied
    /// so that the new cache can go on writing into it.
    pub fn share(&self, cache: &SeqCache, n: usize) -> Result<SeqCache> {
        if n > cache.len {
            candle_core::bail!("prefix of {n} positions from a cache of {}", cache.len);
        }
        let mut out = SeqCache {
            blocks: Vec::new(),
            len: n,
            owner: Some(self.blocks.clone()),
        };
        {
            let mut table = lock(&self.blocks);
            for &b in &cache.blocks[..n / KV_BLOCK] {
                table.refs[b as usize] += 1;
                out.blocks.push(b);
            }
        }
        if !n.is_multiple_of(KV_BLOCK) {
            let from = cache.blocks[n / KV_BLOCK] as usize * KV_BLOCK;
            self.grow(&mut out, n)?;
            let to = *out.blocks.last().expect("just grown") as usize * KV_BLOCK;
            for (k, v) in &self.layers {
                k.slice_set(&k.narrow(1, from, KV_BLOCK)?.force_contiguous()?, 1, to)?;
                v.slice_set(&v.narrow(1, from, KV_BLOCK)?.force_contiguous()?, 1, to)?;
            }
        }
        Ok(out)
    }
}

/// One sequence's keys and values: the blocks of a `KvPool` it holds, and how many positions are
/// filled (the next token's position). Dropping it gives its blocks back.
#[derive(Default)]
pub struct SeqCache {
    pub(super) blocks: Vec<u32>,
    pub(super) len: usize,
    pub(super) owner: Option<Blocks>,
}

impl SeqCache {
    /// Positions held (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the positions from `len` on (tokens drafted and not taken): the next step writes
    /// there again. The blocks stay held.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Blocks held (some may be shared with other caches).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks this cache still needs to take `t` more positions.
    pub fn blocks_short(&self, t: usize) -> usize {
        (self.len + t)
            .div_ceil(KV_BLOCK)
            .saturating_sub(self.blocks.len())
    }

    /// Where position `i` lives in the store.
    pub(super) fn slot(&self, i: usize) -> u32 {
        self.blocks[i / KV_BLOCK] * KV_BLOCK as u32 + (i % KV_BLOCK) as u32
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        if let Some(owner) = &self.owner {
            let mut table = lock(owner);
            for &b in &self.blocks {
                let r = &mut table.refs[b as usize];
                *r = r.saturating_sub(1);
                if *r == 0 {
                    table.free.push(b);
                }
            }
        }
    }
}

/// Where a batched step writes and reads: computed once per step, used by every layer.
pub(super) struct StepPlan {
    /// Store position of every new token, repeated over (kv heads, head dim) for `scatter_set`.
    pub(super) write: Tensor,
    pub(super) read: Read,
}

/// How attention reads the store in this step.
pub(super) enum Read {
    /// Decoding on the CPU: each sequence's store positions, in order (the new one last), for
    /// moss's paged attention kernel, which reads the store in place.
    InPlace(Vec<Vec<u32>>),
    /// Otherwise one gather of `width` positions per sequence (padded with position 0) and one
    /// batched product.
    Gather {
        index: Tensor,
        width: usize,
        /// Additive mask (1, batch, 1, t, width): 0 where a query may look, -inf elsewhere
        /// (padding and later positions of the same step); none when nothing is hidden.
        mask: Option<Tensor>,
        /// The same for sliding-window layers, when the window hides something more.
        local_mask: Option<Tensor>,
        /// On the CPU, the same as the columns each (sequence, query position) sees — one range
        /// each, for all layers and for sliding-window ones — for moss's chunk attention, which
        /// needs no mask tensor (the masks above are then not made).
        ranges: Option<ChunkRanges>,
    },
}

impl Decoder {
    /// A key/value store of about `bytes` (at least one block). Its memory is zeroed lazily by the
    /// operating system: only blocks that have been used take room.
    pub fn kv_pool(&self, bytes: usize) -> Result<KvPool> {
        let block_bytes = self.kv_bytes_per_token() * KV_BLOCK;
        let n = (bytes / block_bytes).max(1);
        let shape = (self.n_kv_head, n * KV_BLOCK, self.head_dim);
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, DType::F32, &self.device)?,
                    Tensor::zeros(shape, DType::F32, &self.device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvPool {
            layers,
            blocks: std::sync::Arc::new(std::sync::Mutex::new(BlockTable {
                refs: vec![0; n],
                // Handed out lowest first, so a lightly used store touches little memory.
                free: (0..n as u32).rev().collect(),
            })),
            block_bytes,
        })
    }

    /// Where a decoding step's keys and values go and come from: each row is one token, of
    /// sequence `rows[r].0` at position `rows[r].1`, and sees that sequence's positions up to its
    /// own (the caches already hold the blocks). On the CPU, moss's kernel reads each row's
    /// positions in place; elsewhere every row gathers its own, as a sequence of one new token.
    pub(super) fn plan_rows(
        &self,
        caches: &[&mut SeqCache],
        rows: &[(usize, usize)],
    ) -> Result<StepPlan> {
        if !self.cpu_attention() {
            return self.plan_gather(caches, rows, 1);
        }
        let slots = rows
            .iter()
            .map(|&(s, p)| (0..=p).map(|q| caches[s].slot(q)).collect())
            .collect();
        Ok(StepPlan {
            write: self.write_slots(caches, rows, 1)?,
            read: Read::InPlace(slots),
        })
    }

    /// Where a step of `t` new tokens per sequence writes and reads (the caches already hold the
    /// blocks).
    pub(super) fn plan(&self, caches: &[&mut SeqCache], t: usize) -> Result<StepPlan> {
        let groups: Vec<(usize, usize)> =
            caches.iter().enumerate().map(|(i, c)| (i, c.len)).collect();
        self.plan_gather(caches, &groups, t)
    }

    /// Store positions of `t` new tokens for each group — (sequence, first position) — repeated
    /// over (kv heads, head dim) for `scatter_set`.
    fn write_slots(
        &self,
        caches: &[&mut SeqCache],
        groups: &[(usize, usize)],
        t: usize,
    ) -> Result<Tensor> {
        let write: Vec<u32> = groups
            .iter()
            .flat_map(|&(s, p)| (p..p + t).map(move |q| caches[s].slot(q)))
            .collect();
        let n = write.len();
        Tensor::new(write.as_slice(), &self.device)?
            .reshape((1, n, 1))?
            .broadcast_as((self.n_kv_head, n, self.head_dim))?
            .contiguous()
    }

    /// A step whose groups — (sequence, first position), `t` new tokens each — gather their
    /// sequence's positions, padded to the widest. Query `i` of a group starting at `p` sees
    /// positions `0..=p+i`, and in a sliding-window layer only the last `window` of those: one
    /// range of columns per query, handed as ranges to moss's chunk kernel on the CPU and made
    /// into additive masks elsewhere.
    fn plan_gather(
        &self,
        caches: &[&mut SeqCache],
        groups: &[(usize, usize)],
        t: usize,
    ) -> Result<StepPlan> {
        let write = self.write_slots(caches, groups, t)?;
        let width = groups.iter().map(|&(_, p)| p + t).max().unwrap_or(t);
        let index: Vec<u32> = groups
            .iter()
            .flat_map(|&(s, p)| {
                (0..width).map(move |q| if q < p + t { caches[s].slot(q) } else { 0 })
            })
            .collect();
        let index = Tensor::new(index.as_slice(), &self.device)?;
        let ranges = |window: usize| -> Vec<(usize, usize)> {
            groups
                .iter()
                .flat_map(|&(_, p)| {
                    (0..t).map(move |i| {
                        let end = p + i + 1;
                        (end.saturating_sub(window), end)
                    })
                })
                .collect()
        };
        let global = ranges(usize::MAX);
        let local = (self.local_rope.is_some() && width > self.window).then(|| ranges(self.window));
        if self.cpu_attention() {
            return Ok(StepPlan {
                write,
                read: Read::Gather {
                    index,
                    width,
                    mask: None,
                    local_mask: None,
                    ranges: Some((global, local)),
                },
            });
        }
        let mask = |ranges: &[(usize, usize)]| -> Result<Tensor> {
            let m: Vec<f32> = ranges
                .iter()
                .flat_map(|&(lo, hi)| {
                    (0..width).map(move |j| {
                        if (lo..hi).contains(&j) {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            Tensor::from_vec(m, (1, groups.len(), 1, t, width), &self.device)
        };
        let hidden = global.iter().any(|&(_, hi)| hi < width);
        Ok(StepPlan {
            write,
            read: Read::Gather {
                index,
                width,
                mask: hidden.then(|| mask(&global)).transpose()?,
                local_mask: local.as_deref().map(mask).transpose()?,
                ranges: None,
            },
        })
    }
}
