"""float32 on CUDA, test_gates.test_float32_resets_within_the_bound's inputs (four resets in
80 positions): each backend's error against float64, Triton in chunks of 16 to 128 and the
float32 parallel form (session 19: bench/results/gpu-diag-nvidia-h200-2026-11-27-s19.log);
then stages(): which stage of the forward loses it (the gate scan's b and m, or the kernels'
arithmetic after them). `python bench/diag/gates32.py`.

Session 19 on an H200, b as one float32 cumsum: h 6.6e-4 in one chunk of 128. Under the
interpreter the same kernels gave 3.6e-5 with numpy's sequential cumsum and 4.6e-4 with a
log-step cumsum (a GPU scan's order, tests/test_gates.py's _log_step_cumsum), all of it
explained by b's and m's rounding. Since session 20 the gate scan keeps b as an exact coarse
part and a small fine part (kernels._gates): 4.0e-6 in either order under the interpreter;
the next GPU run says whether CUDA agrees."""
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import test_gates as T  # noqa: E402
from helpers import make_inputs, rel_err  # noqa: E402
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = make_inputs(NH=2, S=T.S, DK=16, DV=24, seed=8, i_range=(-10, 10), f_range=(-5, 8))
x["f"][..., [3, 30, 31, 50]] = -math.inf
w_h, w_last = T._weights(x)
ref = T._grads(x, "parallel", None, False, w_h, w_last, dev="cpu", dt=torch.float64)
for be, ch in (("triton", 16), ("triton", 32), ("triton", 64), ("triton", 128), ("parallel", None),
               ("torch", 128)):
    got = T._grads(x, be, ch, False, w_h, w_last, dev=dev, dt=torch.float32)
    print(be, ch, {n: f"{rel_err(got[n], ref[n]):.1e}" for n in ref}, flush=True)


def stages(L=128):
    """Where the float32 forward loses precision in one chunk of L: the gate scan's b_row
    (chunk-local cumsum of log forget gates) and m_row against float64, the normalizer and h
    of the kernels, and h recomputed in float64 from the kernels' own float32 b_row and m_row
    (the error their rounding alone explains)."""
    from vil_kernels.triton import chunk
    from vil_kernels.utils import log_forget
    x32 = {n: t.to(dev, torch.float32) for n, t in x.items()}
    q, k, v, i, f = (x32[n] for n in "qkvif")
    out = chunk.mlstm_fwd(q, k, v, i, f, None, None, None, 1e-6, L, False, last_states=False)
    h, m_row, n_row, b_row = out[0], out[5], out[6], out[11]
    q, k, v, i, f = (x[n] for n in "qkvif")                          # float64, CPU
    S = q.shape[2]
    lf = log_forget(f)
    pos = torch.arange(S)
    b = torch.zeros_like(lf)
    for c0 in range(0, S, L):
        b[..., c0:c0 + L] = lf[..., c0:c0 + L].cumsum(-1)
    F = lf.cumsum(-1)
    logd = F[..., :, None] - F[..., None, :] + i[..., None, :]
    causal = pos[:, None] >= pos[None, :]
    logd = logd.masked_fill(~causal, -math.inf)
    m = logd.amax(-1)

    def forward(logd, m):
        w = torch.exp(logd - m[..., None])
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) * w
        n = s.sum(-1)
        return n, (s @ v) / (n.abs().maximum(torch.exp(-m)) + 1e-6)[..., None]

    n, href = forward(logd, m)
    bg, mg = b_row[..., :2, :].double().cpu().sum(-2), m_row.double().cpu()  # coarse + fine
    # the kernels' rounded b and m, every other step in float64 (one chunk only: there b_t - b_j
    # is the weight's cumsum difference)
    logd_g = (bg[..., :, None] - bg[..., None, :] + i[..., None, :]).masked_fill(~causal, -math.inf)
    n_e, h_e = forward(logd_g, mg) if L >= S else (n * math.nan, href * math.nan)
    print(f"chunk {L}: b_row {(bg - b).abs().max().item():.1e} (|b| up to "
          f"{b.abs().max().item():.0f}), m_row {(mg - m).abs().max().item():.1e}; kernels: "
          f"n_row {rel_err(n_row.double().cpu(), n):.1e}, h {rel_err(h.double().cpu(), href):.1e};"
          f" float64 from the kernels' b and m: n {rel_err(n_e, n):.1e},"
          f" h {rel_err(h_e, href):.1e}",
          flush=True)


stages(128)
stages(64)
