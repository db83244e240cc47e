//! The block pool of the paged KV cache: fixed-size blocks of token positions, per-sequence block
//! tables, O(1) allocation and release, and prefix reuse. A full block is keyed by a chained hash
//! of its tokens, the hash of every block before it, and a cache salt (one per tenant or
//! patient), so a prompt that starts like an earlier one with the same salt reuses its blocks, and
//! one patient's cached prompt is never reused, or timed, by another. Released blocks that hold a
//! cached prefix stay reusable until the pool needs them (least recently released first).
//!
//! This module is the bookkeeping only: [`super::kv_cache::KvCache`] holds the K/V storage the
//! block ids index.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("a sequence of {tokens} tokens needs {needed} KV blocks; the whole cache has {total}")]
    TooLarge {
        tokens: usize,
        needed: usize,
        total: usize,
    },
    #[error("{needed} KV blocks needed, {available} available")]
    OutOfBlocks { needed: usize, available: usize },
}

/// A sequence's blocks, in order, and how many token positions they hold.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
    /// Leading blocks registered in the prefix cache, and the chained hash of the last of them.
    hashed: usize,
    chain: u64,
}

impl BlockTable {
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Token positions written (or reserved) so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// Free but holding a reusable prefix.
    pub cached: usize,
    pub free: usize,
    /// Full prompt blocks looked up in the prefix cache, and how many were found.
    pub prefix_lookups: u64,
    pub prefix_hits: u64,
}

/// Doubly linked list over block ids (the reusable-prefix blocks, oldest release first).
#[derive(Debug)]
struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    len: usize,
}

impl Lru {
    fn new(n: usize) -> Self {
        // Node `n` is the sentinel.
        Self {
            prev: vec![n as u32; n + 1],
            next: vec![n as u32; n + 1],
            len: 0,
        }
    }

    fn sentinel(&self) -> u32 {
        (self.prev.len() - 1) as u32
    }

    fn push_back(&mut self, b: u32) {
        let s = self.sentinel();
        let last = self.prev[s as usize];
        self.next[last as usize] = b;
        self.prev[b as usize] = last;
        self.next[b as usize] = s;
        self.prev[s as usize] = b;
        self.len += 1;
    }

    fn remove(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let s = self.sentinel();
        let first = self.next[s as usize];
        (first != s).then(|| {
            self.remove(first);
            first
        })
    }
}

/// The pool.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refs: Vec<u32>,
    hash_of: Vec<Option<u64>>,
    by_hash: HashMap<u64, u32>,
    /// Free blocks holding nothing reusable.
    free: Vec<u32>,
    /// Free blocks holding a reusable prefix.
    cached: Lru,
    lookups: u64,
    hits: u64,
}

fn chain_hash(parent: u64, salt: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    salt.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0 && num_blocks < u32::MAX as usize);
        Self {
            block_size,
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as u32).rev().collect(),
            cached: Lru::new(num_blocks),
            lookups: 0,
            hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free, or free holding a prefix that may be evicted).
    pub fn available(&self) -> usize {
        self.free.len() + self.cached.len
    }

    pub fn usage(&self) -> PoolUsage {
        PoolUsage {
            total: self.total(),
            used: self.total() - self.available(),
            cached: self.cached.len,
            free: self.free.len(),
            prefix_lookups: self.lookups,
            prefix_hits: self.hits,
        }
    }

    /// Blocks to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Refuses at once a sequence that could never fit, even in an empty cache.
    pub fn check_fits(&self, tokens: usize) -> Result<(), PoolError> {
        let needed = self.blocks_for(tokens);
        if needed > self.total() {
            return Err(PoolError::TooLarge {
                tokens,
                needed,
                total: self.total(),
            });
        }
        Ok(())
    }

    /// Blocks `table` needs to grow by `tokens` positions.
    pub fn needed(&self, table: &BlockTable, tokens: usize) -> usize {
        self.blocks_for(table.len + tokens)
            .saturating_sub(table.blocks.len())
    }

    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.cached.pop_front()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Grows `table` by `tokens` positions, taking blocks as needed; all or nothing.
    pub fn grow(&mut self, table: &mut BlockTable, tokens: usize) -> Result<(), PoolError> {
        let needed = self.needed(table, tokens);
        if needed > self.available() {
            return Err(PoolError::OutOfBlocks {
                needed,
                available: self.available(),
            });
        }
        for _ in 0..needed {
            let b = self.take_block().expect("counted as available");
            table.blocks.push(b);
        }
        table.len += tokens;
        Ok(())
    }

    /// Gives back every block of `table`; blocks holding a registered prefix stay reusable.
    pub fn release(&mut self, table: BlockTable) {
        for b in table.blocks {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released twice");
            *r -= 1;
            if *r == 0 {
                if self.hash_of[b as usize].is_some() {
                    self.cached.push_back(b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// A new sequence for `prompt`, starting with the cached blocks of its longest registered
    /// prefix under `salt`. At least one prompt token is always left to compute (its logits are
    /// needed), so at most `(prompt.len() - 1) / block_size` blocks are reused. The table's `len`
    /// is the number of reused positions.
    pub fn start(&mut self, prompt: &[u32], salt: u64) -> BlockTable {
        let mut table = BlockTable::default();
        let reusable = prompt.len().saturating_sub(1) / self.block_size;
        for chunk in prompt.chunks(self.block_size).take(reusable) {
            self.lookups += 1;
            let h = chain_hash(table.chain, salt, chunk);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            self.hits += 1;
            if self.refs[b as usize] == 0 {
                self.cached.remove(b);
            }
            self.refs[b as usize] += 1;
            table.blocks.push(b);
            table.len += self.block_size;
            table.hashed += 1;
            table.chain = h;
        }
        table
    }

    /// Registers the full blocks of `table` written since the last call, `tokens` being every
    /// token of the sequence so far, so later prompts with the same salt can reuse them.
    pub fn register(&mut self, table: &mut BlockTable, tokens: &[u32], salt: u64) {
        let full = tokens.len().min(table.len) / self.block_size;
        while table.hashed < full {
            let i = table.hashed;
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let h = chain_hash(table.chain, salt, chunk);
            let b = table.blocks[i];
            // The first block with this content keeps the key; a duplicate stays private.
            if self.hash_of[b as usize].is_none() && !self.by_hash.contains_key(&h) {
                self.by_hash.insert(h, b);
                self.hash_of[b as usize] = Some(h);
            }
            table.chain = h;
            table.hashed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rng::SplitMix64;

    fn prompt(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    #[test]
    fn grow_and_release_account_for_every_block() {
        let mut pool = BlockPool::new(8, 4);
        let mut t = BlockTable::default();
        pool.grow(&mut t, 5).unwrap();
        assert_eq!((t.len(), t.blocks().len()), (5, 2));
        pool.grow(&mut t, 3).unwrap();
        assert_eq!(
            t.blocks().len(),
            2,
            "position 8 still fits the second block"
        );
        pool.grow(&mut t, 1).unwrap();
        assert_eq!(t.blocks().len(), 3);
        let err = pool.grow(&mut t, 100).unwrap_err();
        assert!(matches!(err, PoolError::OutOfBlocks { .. }));
        assert_eq!(t.len(), 9, "a failed grow changes nothing");
        assert_eq!(pool.usage().used, 3);
        pool.release(t);
        assert_eq!(pool.available(), 8);
        assert!(matches!(
            pool.check_fits(33),
            Err(PoolError::TooLarge {
                needed: 9,
                total: 8,
                ..
            })
        ));
        assert!(pool.check_fits(32).is_ok());
    }

    #[test]
    fn a_prompt_reuses_the_blocks_of_an_earlier_one_with_the_same_salt_only() {
        let mut pool = BlockPool::new(16, 4);
        let p = prompt(14, 1); // 3 full blocks + 2
        let mut a = pool.start(&p, 42);
        assert_eq!(a.len(), 0);
        pool.grow(&mut a, p.len()).unwrap();
        pool.register(&mut a, &p, 42);
        let a_blocks = a.blocks().to_vec();
        // While A runs, B with the same prompt shares A's full blocks.
        let b = pool.start(&p, 42);
        assert_eq!(b.blocks(), &a_blocks[..3]);
        assert_eq!(b.len(), 12);
        pool.release(a);
        pool.release(b);
        // After both left, the prefix is still cached; another salt sees nothing.
        assert_eq!(pool.usage().cached, 3);
        let other = pool.start(&p, 7);
        assert!(other.is_empty());
        let c = pool.start(&p, 42);
        assert_eq!(c.blocks(), &a_blocks[..3]);
        assert_eq!(pool.usage().cached, 0);
        // A prompt that differs in its second block reuses only the first.
        let mut q = p.clone();
        q[5] += 1;
        let d = pool.start(&q, 42);
        assert_eq!(d.blocks(), &a_blocks[..1]);
        // A prompt exactly one block long keeps its last token to compute.
        assert!(pool.start(&p[..4], 42).is_empty());
        pool.release(c);
        pool.release(d);
        let u = pool.usage();
        assert_eq!(u.free + u.cached, 16);
        assert!(u.prefix_hits >= 7 && u.prefix_lookups > u.prefix_hits);
    }

    #[test]
    fn cached_prefixes_are_evicted_oldest_first_when_blocks_run_out() {
        let mut pool = BlockPool::new(4, 2);
        for seed in [1, 2] {
            let p = prompt(4, seed);
            let mut t = pool.start(&p, 0);
            pool.grow(&mut t, 4).unwrap();
            pool.register(&mut t, &p, 0);
            pool.release(t);
        }
        assert_eq!(pool.usage().cached, 4);
        // Two new blocks evict prompt 1's blocks (released first).
        let mut t = BlockTable::default();
        pool.grow(&mut t, 4).unwrap();
        assert_eq!(pool.start(&prompt(5, 1), 0).len(), 0, "prompt 1 evicted");
        let kept = pool.start(&prompt(5, 2), 0);
        assert_eq!(kept.len(), 4, "prompt 2 still cached");
        pool.release(kept);
        pool.release(t);
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn a_thousand_random_requests_with_cancellations_leave_every_block_free() {
        let mut pool = BlockPool::new(64, 16);
        let mut rng = SplitMix64::new(3);
        let mut running: Vec<(BlockTable, Vec<u32>, u64)> = Vec::new();
        for _ in 0..1000 {
            // Start one, grow some, cancel or finish some.
            let len = 1 + (rng.next_u64() % 100) as usize;
            let shared = rng.next_u64().is_multiple_of(3);
            let p = if shared {
                prompt(len, 0)
            } else {
                prompt(len, rng.next_u64() as u32)
            };
            let salt = rng.next_u64() % 2;
            if pool.check_fits(len).is_ok() {
                let mut t = pool.start(&p, salt);
                let rest = p.len() - t.len();
                if pool.grow(&mut t, rest).is_ok() {
                    pool.register(&mut t, &p, salt);
                    running.push((t, p, salt));
                } else {
                    pool.release(t);
                }
            }
            for (t, tokens, salt) in running.iter_mut() {
                if rng.next_u64().is_multiple_of(2) && pool.grow(t, 1).is_ok() {
                    tokens.push(rng.next_u64() as u32 % 1000);
                    pool.register(t, tokens, *salt);
                }
            }
            while !running.is_empty() && !rng.next_u64().is_multiple_of(3) {
                let i = (rng.next_u64() % running.len() as u64) as usize;
                let (t, _, _) = running.swap_remove(i);
                pool.release(t);
            }
            let u = pool.usage();
            assert_eq!(u.used + u.cached + u.free, u.total);
        }
        for (t, _, _) in running.drain(..) {
            pool.release(t);
        }
        assert_eq!(pool.available(), pool.total());
        assert_eq!(pool.usage().used, 0);
        assert!(pool.refs.iter().all(|&r| r == 0));
    }
}
