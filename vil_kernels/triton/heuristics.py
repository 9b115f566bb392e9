"""Launch parameters of the chunkwise mLSTM kernels, keyed on (head dims, chunk, dtype, arch).

Head dims are tiled by the largest of 64 / 32 / 16 that divides them (96 -> 3 x 32, 192 -> 3 x 64,
384 -> 6 x 64: no padding of 96 up to 128), except, on Hopper, the V tiles of the scans, the output
and the dv kernels: 128 for 16-bit inputs with DV > 64 (masked where DV is not a multiple). Chunks
(the state kept at their boundaries) of 64 positions by default (fewer for short sequences; float32
inputs: 32), any power of two up to 1024 on request; the kernels take them in tiles of at most 64
positions (float32: 32). On Hopper (measured on an H200 and an H100 with bench/tune.py, see
_table_params): 4 warps, two pipeline stages for 16-bit inputs (three in the scans where that keeps
their register cap), the scans' registers capped for one more program an SM where that does not
spill (see scan_maxnreg), and, not timed yet, the backward pair and dq/dk kernels' the same way
(backward_maxnreg). On Ampere (not measured): 8 warps from 64 positions, one stage, V tiles
of at most 32 in the outputs and dq/dk kernels there. Chunks of several tiles (on request, and
by default one chunk for 16-bit sequences up to 1024 at head dims from 384: ONE_CHUNK_UP_TO,
timed on an H200; their launch parameters were not swept) take the same parameters except where
they would spill: the scans uncapped, float32 inputs in tiles of 16 positions; their two pair
kernels (PAIR_KERNELS) take the head-dim tiles of the rules above (64, 32 or 16), 4 warps on
Hopper and two stages for 16-bit inputs, and one key tile a program (KT; 2 or 4 at 8 warps
load a row tile's q and dh once for that many pairs: opt-in, PAIR_KEY_TILES, until timed).
One chunk holding the sequence with no carried state may take FlashAttention's form
(FLASH_FORWARD, FLASH_BACKWARD; off by default, slower at D=384 on an H200): the forward in one
kernel (mlstm_fwd_flash_kernel, flash_params), the backward's pair products and dq in one kernel
(mlstm_bwd_flash_kernel). Everything is also checked ahead of
time without a GPU (``python -m vil_kernels.compile_check``: no spills, shared memory under the
arch's limit, tensor cores used for 16-bit inputs, no pipelining races). OVERRIDES lets
bench/tune.py sweep; a table it measured on another GPU is used where $VIL_KERNELS_LAUNCH_TABLE
names its file.
"""

import json
import os

import torch

from .._triton_runtime import UNCAPPED
from ..utils import next_power_of_2

# Largest tile of positions the matmul kernels take (16-bit and float64 inputs; float32: 32):
# a [BT, BT] float32 tile (q k^T, scores, dS) and [BT, 64] accumulators at 4 warps. Longer
# chunks run as several tiles (kernels.py: NT tiles a chunk).
MAX_TILE = 64
DEFAULT_CHUNK = 64
# Longest chunk: the gate scan holds one chunk's gates as a [1, L] tile, and a tile's program
# loops over up to L / BT - 1 others. The chunk length only changes the rounding, never the
# function: a longer chunk keeps fewer states (S / L of DK x DV a head, the largest memory
# traffic of a pass at large head dims) for more intra-chunk products. The gate scan's exact
# coarse cumsums hold up to 1024 terms of at least F_MIN on their grid (kernels._GRID).
MAX_CHUNK = 1024
# 16-bit sequences up to ONE_CHUNK_UP_TO positions at head dims of ONE_CHUNK_HEAD_DIM or more
# run as one chunk by default: the quadratic, attention-like form, with no chunk state, no
# scan and nothing kept for the backward but h and row statistics. Timed on an H200
# (bench/results/kernels-nvidia-h200-bf16-chunks-s14.json, B=64, NH=4, S=784, bf16): at
# D=384 one chunk of 1024 against chunks of 64 took 1.08 against 1.52 ms forward and 3.76
# against 4.86 ms forward and backward; at D=192 the forward got slower (0.79 against 0.65 ms,
# fwd+bwd 2.55 against 2.69), at D=96 both (fwd+bwd 2.34 against 1.92): the state a chunk
# hands on grows with D x D, the pair work with S x S only. At most MAX_CHUNK.
ONE_CHUNK_UP_TO = 1024
ONE_CHUNK_HEAD_DIM = 384
# ptxas otherwise sometimes settles on 128 registers and spills a few bytes (compile_check
# caught 8-byte spills at exactly 128 registers in four variants): let it use up to 255. The
# caps below it in this table were checked with Triton 3.6's ptxas; where another release's
# ptxas spills under one, the launcher runs that build uncapped (_triton_runtime's spill guard).
MAXNREG = UNCAPPED
KERNELS = ("fwd_state", "fwd_out", "bwd_state", "bwd_dqk", "bwd_dv", "fwd_pair", "bwd_pair",
           "fwd_flash", "bwd_flash")
FLASH_KERNELS = ("fwd_flash", "bwd_flash")
# the kernels of chunks of several tiles only: every (row tile, key tile up to it) pair's
# products once, which the outputs, dq/dk and dv kernels then load (kernels.py)
PAIR_KERNELS = ("fwd_pair", "bwd_pair")
SCANS = ("fwd_state", "bwd_state")

# Chunks of several tiles, forward: where one V tile of the outputs kernel holds DV (for 16-bit
# inputs on Hopper value head dims up to 128), that kernel computes each pair's scores itself
# instead of loading them from mlstm_fwd_pair_kernel: the same products once either way, the
# same bits, minus a launch and the [BT, BT] scores' round trip through memory, for twice
# the outputs kernel's registers (about 230 against 122 on sm_90: two programs an SM instead
# of four). Chosen by that arithmetic, not timed on a GPU yet: $VIL_KERNELS_SCORES_IN_OUTPUTS=0
# turns it off, so that bench/gpu_session.sh's tiles step times both.
SCORES_IN_OUTPUTS = os.environ.get("VIL_KERNELS_SCORES_IN_OUTPUTS", "1") != "0"


def scores_in_outputs(DV, BV, BT, NT):
    """Whether the outputs kernel (V blocks of BV columns: BV + BV2 with two tiles) computes the
    pair scores of chunks of NT tiles of BT itself (SCORES_IN_OUTPUTS): where one V block holds
    DV, in tiles of at most 64 positions (in tiles of 128 its sm_90 builds spill 24-208 bytes,
    compile_check)."""
    return SCORES_IN_OUTPUTS and NT > 1 and DV <= BV and BT <= 64


# Chunks of several tiles, forward, any head dim: FlashAttention's form. Where the chunk holds
# the whole sequence with no carried state (ViL's cells), mlstm_fwd_flash_kernel replaces the
# pair and outputs kernels: a program holds a row tile of q over all of DK and walks the key
# tiles (BS positions: 32 at head dims of 192 and more, where two stages of [BS, DK + DV] tiles
# and q must fit shared memory; 16 from 768 columns, flash_params) in one software-pipelined
# loop, every value column in its accumulators; head dims that are not a power of two are two
# tiles (flash_tiles: 384 = 256 + 128). No forward pair kernel, no [BT, BT] scores through
# memory, q and k read once a pair instead of once a pair and V tile.
# The backward's counterpart, for one chunk without carried state: mlstm_bwd_flash_kernel takes
# a row tile of q and dh over all of DK and DV and walks the key tiles in one pipelined loop,
# making each pair's products (the backward pair kernel's, stored for the dk and dv kernels)
# and dq over all of DK; the dq/dk kernel then makes dk alone. By count at ViL-B's shape it
# loads about 4 GB fewer between L2 or HBM and the SMs (it no longer runs there:
# FLASH_BWD_MAX_COLUMNS).
# Their price is the 8-warp builds that wide head dims need (flash_params): Triton lays out a
# dot that feeds a dot across all warps along the rows, so a 64-row tile's scores are computed
# on both warpgroups (compile_check's "d"). Timed on an H200 (bf16, B=64, NH=4, S=784, one
# chunk of 1024; bench/results/kernels-nvidia-h200-bf16-flash-s19.json; host-timed medians,
# one run each; key tiles of 32 in the forward at D=384 and the backward at 192, and the
# backward's form at 384, as they no longer run), both forms on against both off:
#   D=384 (8-warp builds)   forward 0.811 -> 1.3 ms, forward and backward 3.8 -> 6.3 ms
#   D=192 (backward 8 warps) forward 0.661 -> 0.560 ms, forward and backward 2.7 -> 3.5 ms
#   D=96  (4 warps)         forward 0.708 -> 0.513 ms, forward and backward 2.4 -> 1.9 ms
# ViL-B's inference at 448 px ran 1235 -> 1073 img/s with the forward's form. Repeats of one
# configuration in the same session moved by up to 1.7x forward and 10-25% forward and
# backward at D <= 192 (kernels-nvidia-h200-bf16-chunk64-repeat-*-s19.json), so only D=384's
# loss stands out of the noise. Off by default; one chunk is the default only from D=384
# (ONE_CHUNK_HEAD_DIM), where both forms lost. $VIL_KERNELS_FLASH_FORWARD and
# $VIL_KERNELS_FLASH_BACKWARD: 1 (on wherever the form applies), 0 (off, the default), auto
# (each where its build takes 4 warps, flash_wanted: the forward up to 192 value columns, the
# backward up to 128 of dq). Forced on, a forward with carried states (several chunks, or an
# initial state) also has the outputs kernel take every V column of a row tile as two V tiles
# (flash_tiles, from 129 columns, at 8 warps) and compute each pair's scores itself (slower
# at D=384 on the H200: 6.0 -> 9.7 ms forward at S=3136 in chunks of 1024).
FLASH_ENV = {"forward": "VIL_KERNELS_FLASH_FORWARD", "backward": "VIL_KERNELS_FLASH_BACKWARD"}
_FLASH_WORDS = {**dict.fromkeys(("1", "on", "true", "yes"), True),
                **dict.fromkeys(("0", "off", "false", "no", ""), False), "auto": None}


def flash_setting(name):
    """The setting $VIL_KERNELS_FLASH_<name> asks for: True (on), False (off, the default) or
    None (auto)."""
    value = os.environ.get(FLASH_ENV[name], "0").strip().lower()
    if value not in _FLASH_WORDS:
        raise ValueError(f"${FLASH_ENV[name]} must be 1 (on), 0 (off) or auto, got {value!r}")
    return _FLASH_WORDS[value]


FLASH_FORWARD = flash_setting("forward")
FLASH_BACKWARD = flash_setting("backward")
# widest V block of the flash form: a [64, 512] float32 accumulator is 128 registers a thread
# at 8 warps (compile_check: 252 in all at sm_90, no spill)
FLASH_MAX_COLUMNS = 512
# widest q and h together (the forward), widest dq (the backward) and widest q, dh and dq
# together (the backward), in the columns of their tiles (flash_tiles): past these the sm_90
# builds spill at every key tile with some Triton release. The forward at 512 + 512 (Triton
# 3.9: 256-408 bytes at key tiles of 16 and 32); the backward's dq at 384 (3.6: from 512,
# 376-1,272 bytes at key tiles of 16 to 64; 3.9: from 384, 168-628 bytes at 16), and at
# 192 + 384 or 256 + 384 (3.8, float16: 192-264 bytes at 16), 192 + 512 or 256 + 512 (3.9:
# 48-96 bytes at 16)
FLASH_MAX_BOTH_COLUMNS = 896
FLASH_BWD_MAX_COLUMNS = 256
FLASH_BWD_MAX_BOTH_COLUMNS = 512


def flash_tiles(DV):
    """(BV, BV2): the two powers of two (BV2 = 0: one) whose tiles cover DV with the fewest
    masked columns, both at least 16: 384 -> (256, 128), 192 -> (128, 64), 96 -> (64, 32),
    40 -> (32, 16); a power of two is one tile, and so is DV where two tiles would mask as
    much as one (100 -> (128, 0))."""
    one = max(16, next_power_of_2(DV))
    if one == DV or one <= 16:
        return one, 0
    BV = one // 2
    BV2 = max(16, next_power_of_2(DV - BV))
    return (BV, BV2) if BV + BV2 < one else (one, 0)


def flash_wanted(DK, DV, backward=False):
    """Whether FLASH_FORWARD (with backward: FLASH_BACKWARD) asks for the flash form at these
    head dims: on, off, or auto (None): where flash_params builds it at 4 warps."""
    setting = FLASH_BACKWARD if backward else FLASH_FORWARD
    if setting is None:
        return flash_params(DK, DV, "bwd_flash" if backward else "fwd_flash")["num_warps"] == 4
    return bool(setting)


def flash_applies(DK, DV, BT, NT, dtype, arch, backward=False):
    """Whether the forward (FLASH_FORWARD), or with backward the backward (FLASH_BACKWARD),
    takes the flash form (as flash_wanted says): chunks of several tiles of at most 64
    positions, 16-bit (and float64) inputs (float32's tf32x3 operands double the registers),
    Hopper (and the interpreter; on sm_80 the flash kernel spills and the outputs kernel keeps
    V tiles of 32, compile_check), head dims up to FLASH_MAX_COLUMNS and FLASH_MAX_BOTH_COLUMNS
    (the backward: FLASH_BWD_MAX_COLUMNS and FLASH_BWD_MAX_BOTH_COLUMNS). (The backward's form
    is for one chunk without carried state only: the caller checks that.)"""
    K, V = sum(flash_tiles(DK)), sum(flash_tiles(DV))
    if backward and (K > FLASH_BWD_MAX_COLUMNS or K + V > FLASH_BWD_MAX_BOTH_COLUMNS):
        return False
    return (flash_wanted(DK, DV, backward) and NT > 1 and BT <= 64
            and dtype != torch.float32 and not 0 < arch < 90
            and max(K, V) <= FLASH_MAX_COLUMNS and K + V <= FLASH_MAX_BOTH_COLUMNS)


def device_arch(device):
    """sm version as an int (80, 90, ...) for CUDA devices; 0 for the interpreter on the CPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0


def head_block(D):
    """Tile of a head dim: 64, 32 or 16 if it divides D (no masked lanes), else <= 64, masked."""
    for blk in (64, 32, 16):
        if D % blk == 0:
            return blk
    return min(64, max(16, next_power_of_2(D)))


def max_tile(dtype):
    """Largest tile of positions for an input dtype: float32 operands (tf32x3: every tile split
    in two) need twice the registers of 16-bit ones."""
    return 32 if dtype == torch.float32 else MAX_TILE


def chunk_len(S, DK, DV, dtype, arch, requested=None):
    """Positions per chunk L (the state is kept at chunk boundaries): the requested power of
    two, at most MAX_CHUNK and no longer than the sequence needs (one chunk holds it either
    way); by default DEFAULT_CHUNK, at most one tile (max_tile), shortened for sequences that
    fit one smaller chunk, or the whole sequence in one for 16-bit inputs up to
    ONE_CHUNK_UP_TO positions at head dims of ONE_CHUNK_HEAD_DIM or more. The chunk length
    only changes the rounding, never the function."""
    fits = max(16, next_power_of_2(S))
    if requested is not None:
        return min(int(requested), MAX_CHUNK, fits)
    if (S <= min(ONE_CHUNK_UP_TO, MAX_CHUNK) and max(DK, DV) >= ONE_CHUNK_HEAD_DIM
            and dtype in (torch.float16, torch.bfloat16)):
        return fits
    return min(DEFAULT_CHUNK, max_tile(dtype), fits)


def tile_len(L, dtype, DK=0, DV=0, arch=0):
    """Positions per tile BT of the matmul kernels for chunks of L: the chunk up to max_tile,
    longer chunks in tiles of max_tile, for float32 inputs of 16 (at 32 the multi-tile loops'
    tf32x3 operands spill, compile_check). Chunks of several tiles take another tile where
    TILE or a measured table's "tile" entry says so (tuned_tile)."""
    if L <= max_tile(dtype):
        return L
    # (the lookup only where a tile may be asked for: this runs a few times a pass)
    tuned = tuned_tile(L, dtype, DK, DV, arch) if TILE is not None or tuned_table() else None
    return tuned or (16 if dtype == torch.float32 else max_tile(dtype))


def tuned_tile(L, dtype, DK, DV, arch):
    """The tile of positions TILE or a measured table's "tile" entry ({"BT": n}, keyed like a
    kernel's: table_key("tile", ...)) asks for in chunks of L, where it applies: a power of
    two in TUNABLE_TILES that still leaves several tiles a chunk (so that it changes the tile
    shape of the multi-tile kernels, never which kernels run), and for 16-bit (and float64)
    inputs only (float32's tf32x3 operands spill beyond tiles of 16 there), on Hopper (and the
    interpreter) only: on sm_80 the backward's pair kernel spills in tiles of 128 at every
    head-dim tile (compile_check). None otherwise."""
    BT = TILE
    if BT is None:
        BT = tuned_table().get(table_key(TILE_ENTRY, DK, DV, L, dtype, arch), {}).get("BT")
    elif BT not in TUNABLE_TILES:
        raise ValueError(f"heuristics.TILE must be one of {TUNABLE_TILES} or None, got {BT!r}")
    return BT if BT is not None and tile_applies(BT, L, dtype, arch) else None


def tile_applies(BT, L, dtype, arch):
    """Whether chunks of L take a tile of BT positions asked for (tuned_tile's conditions)."""
    return dtype != torch.float32 and 2 * BT <= L and not 0 < arch < 90


# Per-kernel launch parameters forced by bench/tune.py while it sweeps configurations on a GPU:
# {kernel: {param: value}}, applied over everything else. Empty in normal use.
OVERRIDES = {}
# Tiles of positions that chunks of several tiles may take instead of MAX_TILE, and the one
# bench/kernels.py --tile and bench/tune.py --tile force (None in normal use; tuned_tile). At
# 128 positions the matmul kernels take 8 warps (two warpgroups of 64 rows on Hopper): the
# [128, 128] tiles of the Triton fused-attention tutorial's Hopper configurations, which halve
# the pair kernels' loads of q and k a product (every pair of tiles reads both over the whole
# head dim). Compiled for sm_90 without spills (compile_check --tile 128; on sm_80 they never
# apply, tile_applies); not timed on a GPU yet, so not a default.
TUNABLE_TILES = (16, 32, 64, 128)
TILE = None
# A launch table measured on one's own GPU (bench/tune.py --write-table FILE), used over the
# built-in one for the entries it has: opt-in autotuning.
TABLE_ENV = "VIL_KERNELS_LAUNCH_TABLE"
_PARAMS = {"BK", "BV", "BK2", "BV2", "BS", "KT", "num_warps", "num_stages", "maxnreg",
           "split"}
# parameters only some kernels take
_OWN_PARAMS = {"split": SCANS, "BK2": FLASH_KERNELS, "BS": FLASH_KERNELS,
               "BV2": ("fwd_out",) + FLASH_KERNELS, "KT": PAIR_KERNELS}
# Key tiles a pair kernel's program may take (KT): its row tile's q (and dh) are loaded once
# for that many pairs, the same products and bits (bench/traffic.py at ViL-B's shape in one
# chunk: the two pair kernels move 7.1 GB at one, 5.7 at two, 5.0 at four). At two and 8 warps
# they build at 96-128 registers under a cap of 128 (_pair_key_tiles_fit), two programs an SM
# (compile_check --key-tiles 2). 1 in the built-in table until a GPU has timed them;
# bench/tune.py sweeps 2 and 4 at 8 warps.
PAIR_KEY_TILES = (1, 2, 4)
TILE_ENTRY = "tile"             # a table's entry for the tile of positions: {"BT": n}
_tuned = None                                                    # {key: params}, loaded once
# launch_params' answers while OVERRIDES is empty (emptied when the table is reloaded): the
# lookups ran ~10 us each, nine a forward and backward, host time that small shapes wait on
_cache = {}


def launch_params(kernel, DK, DV, L, dtype, arch, state=None):
    """BK, BV, num_warps, num_stages, maxnreg for one kernel in chunks of L positions (tiles of
    tile_len(L): L itself up to 64), and for the two scans split: run
    the scan as a parallel pass of each chunk's own term and an elementwise chain linking them
    (mlstm_chunk_local_kernel, mlstm_chunk_chain_kernel; BK, BV, warps, stages and the cap
    then apply to the first) instead of one serial program per tile pair. Off in the built-in
    table: on the H200 at ViL-B's shape it ran about 5x slower. dtype: the inputs' torch
    dtype. state: the HAS_STATE flag of the outputs, dq/dk and dv kernels where it is known
    (None: parameters that fit either; see backward_maxnreg)."""
    assert kernel in KERNELS, kernel
    key = (kernel, DK, DV, L, dtype, arch, FLASH_FORWARD, FLASH_BACKWARD, state)
    forced = OVERRIDES or TILE is not None
    cached = _cache.get(key) if not forced else None
    if cached is not None:
        return dict(cached)
    BT = tile_len(L, dtype, DK, DV, arch)
    p = _table_params(kernel, DK, DV, BT, L // BT, dtype, arch, state)
    if kernel in SCANS:
        p["split"] = False
    if kernel in PAIR_KERNELS:
        p["KT"] = 1                     # (a key tile a program: PAIR_KEY_TILES)
    named = set()
    for given in (tuned_table().get(table_key(kernel, DK, DV, L, dtype, arch), {}),
                  OVERRIDES.get(kernel, {})):
        p.update(given)
        named |= set(given)
        for tile, second in (("BK", "BK2"), ("BV", "BV2")):
            if tile in given and second not in given and second in p:
                p[second] = 0            # a head-dim tile named alone is the whole block
    if kernel in PAIR_KERNELS:
        # (at most the chunk's tiles: a program's key tiles are one block of KT * BT positions;
        # one in tiles of 128, where two spill 1.5 KB forward and 6.5 KB backward on sm_90)
        p["KT"] = min(p["KT"], max(1, L // BT)) if BT <= MAX_TILE else 1
        if p["KT"] == 2 and arch >= 90 and dtype in (torch.float16, torch.bfloat16):
            _pair_key_tiles_fit(kernel, p, named)
    if kernel == "fwd_out" and p.get("BV2") and p["num_warps"] < 8:
        # two V tiles run 8 warps, the built-in rule's and any table's or sweep's. At 4, on
        # an H200, 64 + 32 columns (Triton 3.6, sm_90) gave wrong second-tile columns, or an
        # out-of-range shared-memory address (compute-sanitizer, at the dot of the scores and
        # the second v tile); 8 warps, and one tile of 64 + 64, were right
        # (bench/results/README.md).
        p["num_warps"] = 8
    if not forced:
        _cache[key] = dict(p)
    return p


def _pair_key_tiles_fit(kernel, p, named):
    """Two key tiles a pair program (KT, 8 warps), 16-bit on Hopper: a register cap of 128,
    two programs an SM, and in the backward K tiles no wider than its V tiles, unless a table
    or sweep names them. Triton 3.6's ptxas took 96-128 registers without them; 3.9's took
    130-146 in the forward (one program an SM), and the backward's 64 x 32 tiles (DK 384, DV
    96) spilled 24 bytes at 128 (compile_check --key-tiles 2). (At four key tiles the
    backward spills at 128 and the forward takes more: left to ptxas and the spill guard.)"""
    if "maxnreg" not in named:
        p["maxnreg"] = 128
    if kernel == "bwd_pair" and "BK" not in named and p["BK"] > p["BV"]:
        p["BK"] = p["BV"]


def table_key(kernel, DK, DV, L, dtype, arch):
    """A measured table's key for one kernel launch in chunks of L:
    "fwd_out/384/384/64/bfloat16/sm90"."""
    return f"{kernel}/{DK}/{DV}/{L}/{str(dtype).replace('torch.', '')}/sm{arch}"


def tuned_table(reload=False):
    """The measured table named by $VIL_KERNELS_LAUNCH_TABLE ({} when unset), read once."""
    global _tuned
    if _tuned is None or reload:
        path = os.environ.get(TABLE_ENV)
        _tuned = read_table(path) if path else {}
        _cache.clear()
    return _tuned


def read_table(path):
    """Entries of a launch-table file, checked: {"entries": {table_key: {param: value}}}."""
    try:
        with open(path) as fh:
            entries = json.load(fh)["entries"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{TABLE_ENV}={path}: not a launch table ({type(e).__name__}: {e})")
    pow2 = lambda v: isinstance(v, int) and v >= 16 and v & (v - 1) == 0
    checks = {"BK": pow2, "BV": pow2, "BK2": lambda v: v == 0 or pow2(v),
              "BV2": lambda v: v == 0 or pow2(v), "BS": lambda v: pow2(v) and v <= 128,
              "num_warps": lambda v: v in (1, 2, 4, 8, 16),
              "num_stages": lambda v: v in (1, 2, 3, 4),
              "maxnreg": lambda v: v is None or isinstance(v, int) and 32 <= v <= 255,
              "KT": lambda v: v in PAIR_KEY_TILES,
              "split": lambda v: isinstance(v, bool)}
    for key, params in entries.items():
        name = key.split("/")[0]
        if name == TILE_ENTRY and len(key.split("/")) == 6:
            if (not isinstance(params, dict) or set(params) != {"BT"}
                    or params["BT"] not in TUNABLE_TILES):
                raise ValueError(f"{path}: entry {key!r} must be {{\"BT\": n}} with n one of "
                                 f"{TUNABLE_TILES}, got {params!r}")
            continue
        if name not in KERNELS or len(key.split("/")) != 6 or not isinstance(params, dict):
            raise ValueError(f"{path}: bad entry {key!r}")
        bad = {k: v for k, v in params.items()
               if k not in _PARAMS or not checks[k](v) or name not in _OWN_PARAMS.get(k, (name,))}
        if bad:
            raise ValueError(f"{path}: entry {key!r} has invalid launch parameters {bad}")
    return entries


def _table_params(kernel, DK, DV, BT, NT, dtype, arch, state=None):
    if kernel in FLASH_KERNELS:                   # (Hopper and the interpreter)
        return flash_params(DK, DV, kernel)
    BK, BV = head_block(DK), head_block(DV)
    if dtype == torch.float32:
        # tf32x3 splits every fp32 operand into two tf32 tiles: half-size head-dim tiles
        BK, BV = min(BK, 32), min(BV, 32)
    if 0 < arch < 90:
        # Ampere: not measured yet. 4 warps spill here (its MMA keeps more of the accumulators
        # in registers than Hopper's wgmma): the first table's 8 warps at 64 positions. V tiles
        # of at most 32 in the outputs and dq/dk kernels at 64 positions: with 64, Triton
        # 3.7 spills 8 and 368 bytes there (3.6 does not)
        if kernel in ("fwd_out", "bwd_dqk") and BT >= 64:
            BV = min(BV, 32)
        p = dict(BK=BK, BV=BV, num_warps=8 if BT >= 64 else 4, num_stages=1, maxnreg=MAXNREG)
        return dict(p, BV2=0) if kernel == "fwd_out" else p
    # Hopper (and the interpreter, arch 0, so that the tests run this table), measured with
    # bench/tune.py on an H200 (bf16, B=64, NH=4, S=784, D=384, BT=64; the sweeps are
    # bench/results/tune-nvidia-h200-d384*.json):
    # - 4 warps beat 8 in every kernel (1.5-2x: more programs an SM, each a [64, 64] tile);
    # - V tiles of 128 for 16-bit inputs with DV > 64 (masked lanes included where DV is not a
    #   multiple): the output and dv kernels, which recompute q k^T once per V tile, ran 1.5x
    #   faster; the scans, with 2 stages, 1.65x (1.13 -> 0.68 ms, 168-register cap) and 1.5x
    #   (1.10 -> 0.74 ms, no cap);
    # - two pipeline stages for 16-bit inputs everywhere: dq/dk 14% and dv 6% faster (the first
    #   sweep), the scans (above) and the outputs kernel 1.24x (0.63 -> 0.51 ms, in
    #   its QN_MMA form, which removes the pipelining race that gave wrong outputs at 2 stages
    #   in the first sweep; compile_check.pipeline_hazards finds such races in any build);
    # - a 168-register cap (3 programs an SM) in the scans where it does not spill (see
    #   scan_maxnreg). Not taken, though faster at D=384, because they spill (compile_check
    #   rejects spills): 168 in the outputs kernel (0.51 -> 0.47 ms, 416 bytes of spill), the
    #   dv kernel (0.51 -> 0.44 ms, 48 bytes) and the state-gradient scan at 64 x 128 tiles
    #   (0.74 -> 0.66 ms, 48 bytes).
    # Other head dims: the same rules. Swept at 96 and 192 on an H100 (2026-11-26): the
    # winners there (some 168-register caps that compile_check would reject as spilling among
    # them) beat these rules by 2-3% on the whole op; they are a launch-table file in
    # bench/results/launch-table-nvidia-h100-d96-d192.json, not built in.
    sixteen = dtype in (torch.float16, torch.bfloat16)
    if kernel in ("fwd_out", "bwd_dv") + SCANS and sixteen and DV > 64:
        BV = 128
    # (the outputs kernel at 16 positions: one stage; two spilled 8 bytes at 64 x 128 tiles)
    stages = 2 if sixteen and not (kernel == "fwd_out" and BT < 32) else 1
    if sixteen and (kernel == "bwd_state" or kernel == "fwd_state" and BK * BV < 64 * 128):
        # three for the scans, whose loops run every chunk, where that keeps the register cap:
        # on the H200 at S=16384 (B=8, D=96; 32 x 128 tiles) 1.26x (state) and 1.20x (state
        # gradient), at S=784 (D=384) the state-gradient scan, uncapped either way, 1.02x;
        # on the H100 at S=784 1.04-1.12x (D=96, 192). At 64 x 128 tiles the state scan's
        # 168-register cap spills at three stages, and uncapped it ran 1.09x slower at S=784
        # (D=384, B=64: programs an SM count) though 1.08x faster at S=16384 (B=1: 72
        # programs, fewer than SMs); bench/results/tune-nvidia-h*.json
        stages = 3
    warps = 8 if BT >= 128 else 4          # (TUNABLE_TILES: a warpgroup per 64 rows)
    if kernel == "bwd_dqk" and sixteen and BT >= 64 and NT == 1 and BK >= 64 and BV < 64:
        BK = 32             # (64 x 32 tiles, DK a multiple of 64 and DV = 96: a 264-byte spill)
    if kernel == "fwd_out" and sixteen and BT == 32 and BK >= 64 and BV <= 64:
        # (32-position chunks, 64 x 64 tiles with the carried state: 255 registers from
        # Triton 3.6's ptxas, an 80-byte spill from 3.9's; 188 at K tiles of 32)
        BK = 32
    if kernel == "bwd_dqk" and sixteen and BT == 32 and BK < 64 <= BV:
        # (32-position chunks, 32 x 64 tiles with the carried state: 168 registers from
        # Triton 3.6's ptxas at the 168 cap, a 36-byte spill from 3.9's, 40 uncapped; 152 at V
        # tiles of 32)
        BV = 32
    p = dict(BK=BK, BV=BV, num_warps=warps, num_stages=stages, maxnreg=MAXNREG)
    if kernel == "fwd_out":                    # (BV2: its second V tile, none by default)
        p["BV2"] = 0
        if FLASH_FORWARD is True and flash_applies(DK, DV, BT, NT, dtype, arch):
            # (forced on, with carried states) all of DV in one program: two V tiles from 129
            # columns, else one tile; at 8 warps from 129 columns (two tiles at 4 gave wrong
            # outputs, see launch_params; one of 256 spilled 64-144 bytes, of 512 ~8 KB)
            BV, BV2 = flash_tiles(DV)
            if not (BV2 and BV + BV2 > 128):
                BV, BV2 = max(16, next_power_of_2(DV)), 0
            p["BV"], p["BV2"] = BV, BV2
            if BV + BV2 > 128:
                p["num_warps"] = 8
    if kernel in SCANS and NT == 1:
        # (chunks of several tiles: the chunk-boundary step holds more registers, and the
        # capped builds spill)
        p["maxnreg"] = scan_maxnreg(kernel, BT, BK, BV, dtype)
    if kernel in ("bwd_pair", "bwd_dqk") and sixteen:
        p["maxnreg"] = backward_maxnreg(kernel, NT, BK, BV, warps, state)
    return p


def backward_maxnreg(kernel, NT, BK, BV, warps, state=None):
    """Register cap of the backward pair and dq/dk kernels on Hopper (16-bit inputs): the next
    step of programs an SM that ptxas reaches without spilling (compile_check, sm_90, every
    head dim and chunk it builds):
    - the pair kernel: 128 at 4 warps, four programs an SM (149-157 registers uncapped: three;
      in 8-warp tiles of 128 it needs 242-245, and 128 spills);
    - the dq/dk kernel: 168, three (with carried states 131-230 registers uncapped, two
      programs where over 168; 152-164 capped), except at one tile a chunk with K and V
      tiles of 64, where a cap of 168 spills 44-72 bytes; with several tiles a chunk and no
      state (state False: ViL-B's cells in one chunk), 128, four (141 uncapped at K tiles of
      64; with states a cap of 128 spills); in 8-warp tiles of 128 the same caps (no state:
      124 registers instead of 197, two programs an SM instead of one).
    Not timed yet. The same kind of cap made the state scans 1.1-1.3x faster on an H200
    (scan_maxnreg), and 168 made the outputs and dv kernels 8-14% faster there even where it
    spilled (_table_params); bench/tune.py sweeps 128, 168 and none for every kernel."""
    if kernel == "bwd_pair":
        return 128 if warps == 4 else MAXNREG
    if NT == 1 and BK >= 64 and BV >= 64:
        return MAXNREG
    return 128 if NT > 1 and state is False else 168


def flash_params(DK, DV, kernel="fwd_flash"):
    """The flash kernels' tiles (compiled for sm_90 with 16-bit inputs): the
    head dims as flash_tiles, key tiles of 64 positions, or of 32 where the head dims' tiles add
    up to more than 256 columns (at 64, D=384 spills and needs 240 KB of shared memory, and
    D=192 takes 254 registers a thread against 187), of 16 from 768 (the forward) or in 8-warp
    builds (the backward), and 8 warps where the accumulated columns pass what 4 warps hold
    without spilling (a [64, 384] float32 accumulator is 96 registers a thread at 8 warps),
    two pipeline stages. The forward's h: up to 192 columns at 4 warps, key tiles of 32 from
    128 columns (at 8 warps, a 64-row tile's scores are computed on both warpgroups,
    compile_check's doubled_dots; at 4, D=192 takes 243 registers, two programs an SM). The
    backward's dq: up to 128 columns at 4 warps (192 spilled 8-16 bytes beside value head dims
    of 96 and 256). Set to auto (flash_wanted), the forms run where these parameters say 4
    warps."""
    BK, BK2 = flash_tiles(DK)
    BV, BV2 = flash_tiles(DV)
    cols = BV + BV2 if kernel == "fwd_flash" else BK + BK2
    wide = cols > (192 if kernel == "fwd_flash" else 128)
    if kernel == "bwd_flash":
        # the backward holds q and dh and stores two [BT, BS] products a key tile: key tiles of
        # 64 spilled at every head dim from 96 (sm_90, bf16), of 32 at D=384 (204 bytes) and,
        # with Triton 3.9, in most 8-warp builds (dq of 192 or 256 columns: 8-332 bytes); at
        # 16 the score products are half as wide, which costs wgmma throughput (shared-memory
        # reads of q a product), so 32 wherever it fits
        BS = 16 if wide else 32
    elif BK + BK2 + BV + BV2 >= 768:
        # (Triton 3.9 at key tiles of 32: 384 + 384 spilled 80 bytes, 384 + 512 168, 512 + 384
        # 72; at 16 none of them)
        BS = 16
    else:
        BS = 32 if BK + BK2 + BV + BV2 > 256 or cols > 128 else 64
    return dict(BK=BK, BK2=BK2, BV=BV, BV2=BV2, BS=BS, num_warps=8 if wide else 4,
                num_stages=2, maxnreg=MAXNREG)


def scan_maxnreg(kernel, BT, BK, BV, dtype):
    """Register cap of the two state scans at 4 warps on Hopper: the most that still lets one
    more program share an SM without spilling. The scans are latency-bound (a serial chain of
    dependent chunk steps, each a load, a dot and an FMA), so programs an SM is what counts: on
    the H200 (D=384, 2026-11-26) a 168 cap ran them 1.1x faster than none at 64 x 128 tiles
    and two stages, and a 128 cap 1.3x faster than none at 64 x 64 tiles and one stage. 168
    registers = 3 programs of 128 threads in the 64K register file (2 uncapped: ptxas takes
    181-188); 128 = 4, which tiles of at most 32 x 32 of 16-bit inputs at 64 positions fit.
    None (MAXNREG) where the cap would spill, which compile_check rejects: the state-gradient
    scan's 64 x 128 tiles of 16-bit inputs (its float32 copy of the q tile for the dn sum)."""
    sixteen = dtype in (torch.float16, torch.bfloat16)
    if sixteen and BK * BV * BT <= 32 * 32 * 64:
        return 128
    if kernel == "bwd_state" and sixteen and BK * BV >= 64 * 128:
        return MAXNREG
    return 168


def prologue_params(DV, BT, dtype, arch):
    """The backward prologue (one chunk of BT rows a program: a row dot of dh and h, gate
    weights): V tiles of BV, warps. Memory-bound and small; not tuned: [BT, BV] tiles of at
    most 4096 elements (64 x 128 spilled on sm_80), 4 warps."""
    return dict(BV=min(4096 // BT, max(16, next_power_of_2(DV))), num_warps=4)


# Positions a block of the backward's gate epilogue (mlstm_bwd_gates_kernel: one program a head
# walks the sequence, O(S) work): one block up to ViL's 784 tokens; a constant, so one build.
GATES_BLOCK = 1024


def gates_chunks(L):
    """Chunks the forward's gate scan (one program a head) takes at a time: 1024 positions, a
    [chunks, L] tile (16 chunks of 64, ViL's 784 tokens in one), at most 32 chunks (its
    [chunks, chunks] select of each chunk's predecessor took 221 registers at 64)."""
    return max(1, min(32, 1024 // L))


# Warps of the forward's gate scan: four, for its [1024]-position tiles whatever the chunk.
GATES_WARPS = 4


def dot_config(dtype):
    """(MMA operand dtype, accumulator dtype, tl.dot input_precision) names for an input dtype.
    float32 inputs use tf32x3 (three TF32 tensor-core products, float32-level accuracy; plain
    TF32 would miss the 2e-4 contract)."""
    if dtype == torch.float64:
        return "fp64", "fp64", "ieee"
    if dtype == torch.float32:
        return "fp32", "fp32", "tf32x3"
    if dtype == torch.float16:
        return "fp16", "fp32", "ieee"
    return "bf16", "fp32", "ieee"
