"""A reduced form of session 19's wrong answer, for a Triton report: one [64, 64] tile of scores
(a dot's result, cast to bf16) feeding two dots into value tiles of 64 and 32 columns, at 4 and
8 warps, against torch. On an H200 (Triton 3.6) the outputs kernel with this structure gave
wrong columns in its 32-wide tile, or an out-of-range shared-memory address, at 4 warps only
(bench/results/gpu-diag-nvidia-h200-2026-11-27-s19.log). `python bench/diag/two_v_tiles.py`
on a GPU prints the error of each build; it has not run on one yet."""
import torch
import triton
import triton.language as tl


@triton.jit
def two_tiles_kernel(q, k, v, h, NJ, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     BV2: tl.constexpr):
    o_t, o_k = tl.arange(0, BT), tl.arange(0, BK)
    o_v, o_v2 = tl.arange(0, BV), BV + tl.arange(0, BV2)
    DV = BV + BV2
    b_q = tl.load(q + o_t[:, None] * BK + o_k[None, :])                        # [BT, BK]
    b_h = tl.zeros([BT, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BT, BV2], dtype=tl.float32)
    for j in range(NJ):
        o_j = j * BT + o_t
        b_k = tl.load(k + o_j[:, None] * BK + o_k[None, :])                    # [BT, BK]
        b_s = tl.dot(b_q, tl.trans(b_k)).to(tl.bfloat16)                       # [BT, BT]
        b_h += tl.dot(b_s, tl.load(v + o_j[:, None] * DV + o_v[None, :]))      # [BT, BV]
        b_h2 += tl.dot(b_s, tl.load(v + o_j[:, None] * DV + o_v2[None, :]))    # [BT, BV2]
    tl.store(h + o_t[:, None] * DV + o_v[None, :], b_h)
    tl.store(h + o_t[:, None] * DV + o_v2[None, :], b_h2)


def main():
    torch.manual_seed(0)
    BT, BK, NJ = 64, 32, 3
    for BV, BV2 in ((64, 32), (64, 64), (128, 64)):
        for warps in (4, 8):
            for stages in (1, 2):
                q = torch.randn(BT, BK, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(NJ * BT, BK, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(NJ * BT, BV + BV2, device="cuda", dtype=torch.bfloat16)
                h = torch.empty(BT, BV + BV2, device="cuda", dtype=torch.float32)
                try:
                    two_tiles_kernel[(1,)](q, k, v, h, NJ, BT=BT, BK=BK, BV=BV, BV2=BV2,
                                           num_warps=warps, num_stages=stages)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - reported
                    print(f"BV {BV}+{BV2} warps {warps} stages {stages}: {type(e).__name__}")
                    return                                   # (the context is gone)
                s = (q.float() @ k.float().T).to(torch.bfloat16).float()
                ref = s @ v.float()
                err = ((h - ref).abs().max() / ref.abs().max()).item()
                cols = ((h - ref).abs().amax(0) > 1e-2 * ref.abs().max()).nonzero().flatten()
                print(f"BV {BV}+{BV2} warps {warps} stages {stages}: error {err:.1e}, wrong "
                      f"columns {cols.min().item() if len(cols) else '-'}.."
                      f"{cols.max().item() if len(cols) else '-'}", flush=True)


if __name__ == "__main__":
    main()
