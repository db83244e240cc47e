//! Launch table of `kernels/similarity.cu`: the partial top-k kernels compiled side by side (one
//! GPU run can time them all and the host picks per shape), how each is launched, and the merge
//! kernel that combines their per-part lists. The numbers here must match the constants in the
//! `.cu` file (threads per block, queries per block, buffer sizes behind the shared-memory
//! formulas).

/// One compiled partial-top-k kernel of kernels/similarity.cu and how to launch it.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    /// Kernel function name in the PTX, e.g. `"similarity_partial_warp"`.
    pub kernel: &'static str,
    /// Short name for reports, e.g. `"warp"`.
    pub name: &'static str,
    /// Queries per block: the grid's y dimension is `ceil(nq / queries_per_block)`.
    pub queries_per_block: u32,
    /// Threads per block (1-D); the kernel does nothing with any other count.
    pub threads: u32,
    /// Largest k the kernel supports.
    pub max_k: u32,
    /// Largest row width d the kernel supports (a multiple of 8).
    pub max_d: u32,
    /// Dynamic shared memory in bytes for (k, d).
    pub smem_bytes: fn(u32, u32) -> u32,
    /// Whether it uses tensor cores.
    pub tensor_cores: bool,
}

/// Threads of every partial kernel (8 warps).
const PARTIAL_THREADS: u32 = 256;

/// Bytes of one top-k key in shared memory (score and id packed in 64 bits).
const KEY_BYTES: u32 = 8;

/// Slots of a sorted top-k list: the next power of two at or above `k`.
fn list_slots(k: u32) -> u32 {
    k.next_power_of_two()
}

/// `warp`: the query as f16, then one list of `list_slots(k)` keys and a 512-key buffer.
fn smem_warp(k: u32, d: u32) -> u32 {
    2 * d + KEY_BYTES * (list_slots(k) + 512)
}

/// `q8`: 8 queries as f16, then per query a list of `list_slots(k)` keys and a 128-key buffer.
fn smem_q8(k: u32, d: u32) -> u32 {
    8 * (2 * d + KEY_BYTES * (list_slots(k) + 128))
}

/// `mma`: per query (32) a list of `list_slots(k)` keys and a 128-key buffer; tiles are static.
fn smem_mma(k: u32, _d: u32) -> u32 {
    32 * KEY_BYTES * (list_slots(k) + 128)
}

/// `mma64`: as `mma` for 64 queries (static shared memory 36,608 bytes on top).
fn smem_mma64(k: u32, _d: u32) -> u32 {
    64 * KEY_BYTES * (list_slots(k) + 128)
}

/// Bytes of one corpus stage of the pipelined kernels (`mmaq32`, `mmaq64`): 128 rows of 64
/// columns, rows padded to 72 f16.
const PIPE_STAGE_BYTES: u32 = 128 * 72 * 2;
/// Most stages they use (their wait switch covers up to this many).
const PIPE_MAX_STAGES: u32 = 8;
/// Their candidate buffer per query (keys).
const PIPE_BUF: u32 = 64;
/// Slack for rounding the start of their dynamic shared memory up to 128 bytes.
const PIPE_ALIGN: u32 = 128;
/// Dynamic shared memory they may fill: the 227 KB a block can have on sm_90, less 2 KB for
/// their static shared memory (512 bytes for mmaq32, 1,024 for mmaq64).
const PIPE_BLOCK_BUDGET: u32 = 227 * 1024 - 2048;

/// Row length (f16) of the resident query tile of the pipelined kernels: d rounded up to a
/// multiple of 64, plus 8.
fn pipe_ldq(d: u32) -> u32 {
    d.div_ceil(64) * 64 + 8
}

/// Pipelined kernels with `q` queries per block: alignment slack, the resident queries (f16),
/// per query a list of `list_slots(k)` keys and a `PIPE_BUF`-key buffer, then as many corpus
/// stages as fit in `PIPE_BLOCK_BUDGET` (at most `PIPE_MAX_STAGES`). The kernel reads the size
/// it was launched with and derives the stage count from it the same way, so a smaller value
/// only costs pipeline depth (it needs room for 2 stages; the limits below leave room for 3).
/// One block per SM either way; the deeper ring keeps more loads in flight.
fn smem_pipe(q: u32, k: u32, d: u32) -> u32 {
    let fixed = PIPE_ALIGN + q * pipe_ldq(d) * 2 + q * KEY_BYTES * (list_slots(k) + PIPE_BUF);
    let stages =
        (PIPE_BLOCK_BUDGET.saturating_sub(fixed) / PIPE_STAGE_BYTES).clamp(2, PIPE_MAX_STAGES);
    fixed + stages * PIPE_STAGE_BYTES
}

/// `mmaq32`: 32 queries; 4 stages at k = 256, d = 1024, 8 at k <= 128, d = 384.
fn smem_mmaq32(k: u32, d: u32) -> u32 {
    smem_pipe(32, k, d)
}

/// `mmaq64`: 64 queries; 3 stages at k = 128, d = 512, 4 at k = 100, d = 384, 7 at k = 10.
fn smem_mmaq64(k: u32, d: u32) -> u32 {
    smem_pipe(64, k, d)
}

/// Every partial kernel of the PTX, CUDA-core ones first.
pub const VARIANTS: &[Variant] = &[
    Variant {
        kernel: "similarity_partial_warp",
        name: "warp",
        queries_per_block: 1,
        threads: PARTIAL_THREADS,
        max_k: 256,
        max_d: 2048,
        smem_bytes: smem_warp,
        tensor_cores: false,
    },
    Variant {
        kernel: "similarity_partial_q8",
        name: "q8",
        queries_per_block: 8,
        threads: PARTIAL_THREADS,
        max_k: 256,
        max_d: 2048,
        smem_bytes: smem_q8,
        tensor_cores: false,
    },
    Variant {
        kernel: "similarity_partial_mma",
        name: "mma",
        queries_per_block: 32,
        threads: PARTIAL_THREADS,
        max_k: 256,
        max_d: 2048,
        smem_bytes: smem_mma,
        tensor_cores: true,
    },
    Variant {
        kernel: "similarity_partial_mma64",
        name: "mma64",
        queries_per_block: 64,
        threads: PARTIAL_THREADS,
        max_k: 128,
        max_d: 2048,
        smem_bytes: smem_mma64,
        tensor_cores: true,
    },
    Variant {
        kernel: "similarity_partial_mmaq32",
        name: "mmaq32",
        queries_per_block: 32,
        threads: PARTIAL_THREADS,
        max_k: 256,
        max_d: 1024,
        smem_bytes: smem_mmaq32,
        tensor_cores: true,
    },
    Variant {
        kernel: "similarity_partial_mmaq64",
        name: "mmaq64",
        queries_per_block: 64,
        threads: PARTIAL_THREADS,
        max_k: 128,
        max_d: 512,
        smem_bytes: smem_mmaq64,
        tensor_cores: true,
    },
];

/// The kernel that merges the per-part lists of each query into its final top k.
pub const MERGE_KERNEL: &str = "similarity_merge";
/// Threads per block of the merge kernel (one block per query).
pub const MERGE_THREADS: u32 = 512;

/// Dynamic shared memory of the merge kernel: none (its 3 KB are static).
pub fn merge_smem_bytes(_k: u32) -> u32 {
    0
}
