"""The CUDA paths of the "dilated" and "gla" scorers (docs/LIGHTHOUSE.md s.13) against their
float64 CPU twins (skipped without a GPU; the fla comparisons without fla-core).

The CUDA paths compute in bf16 with float32 accumulation (FlashAttention, torch's varlen
kernel, fla's chunk_simple_gla), the twins in float64 from the same bf16-rounded inputs: each
token's score within 3e-2 relative (bf16 outputs carry ~4e-3 relative rounding per element,
their norms less; the bound leaves room for fla's bf16 chunk states) plus 1e-3 absolute, and
the median relative error below 1e-2. The whole layer then runs on the kernel path with each
scorer, forward and backward, with finite results.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from lh_cp import LighthouseConfig, lighthouse_attention  # noqa: E402
from lh_cp.ops import scorers  # noqa: E402
from lh_cp.ops.kernels.ops import kernel_scores  # noqa: E402

N, BATCH, HEADS, KV_HEADS, DIM = 4096, 2, 4, 2, 64
BOUNDS = [0, 700, 701, 2048, 3000, 4096, 4096 + 513, 8192]  # documents over the 2 windows


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, N, HEADS, DIM, generator=gen)
    k, v = (torch.randn(BATCH, N, KV_HEADS, DIM, generator=gen) for _ in range(2))
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def _needs(scorer: str) -> None:
    if scorer == "gla":
        pytest.importorskip(
            "fla", reason="scorer='gla' on CUDA needs fla-core: pip install 'lh-cp[gla]'"
        )


@pytest.mark.parametrize("scorer", ["dilated", "gla"])
@pytest.mark.parametrize("bounds", [None, BOUNDS], ids=["windows", "documents"])
@pytest.mark.parametrize("dilation", [2, 4])
def test_cuda_scores_match_the_float64_twin(scorer, bounds, dilation):
    _needs(scorer)
    cfg = LighthouseConfig(
        pool=4, levels=3, topk=64, tile_budget=8, scorer=scorer, dilation=dilation
    )
    inputs = _inputs(seed=dilation)
    got = scorers.strided_norms(*(x.cuda() for x in inputs), cfg, bounds)
    want = scorers.strided_norms(*(x.double() for x in inputs), cfg, bounds)
    for g, w in zip(got, want):
        g = g.double().cpu()
        assert g.shape == w.shape == (BATCH, HEADS, N)
        torch.testing.assert_close(g, w, rtol=3e-2, atol=1e-3)
        assert ((g - w).abs() / w.clamp(min=1e-3)).median() < 1e-2


@pytest.mark.parametrize("scorer", ["dilated", "gla"])
def test_the_layer_runs_on_the_kernel_path(scorer):
    _needs(scorer)
    cfg = LighthouseConfig(pool=4, levels=3, topk=64, tile_budget=8, scorer=scorer)
    q, k, v = (x.cuda().requires_grad_() for x in _inputs(seed=7))
    query_scores, key_scores = kernel_scores(q, k, cfg, v)
    assert query_scores.dtype == key_scores.dtype == torch.float32
    assert query_scores.shape == key_scores.shape == (BATCH, HEADS, N)
    for documents in (None, torch.tensor(BOUNDS, dtype=torch.int32, device="cuda")):
        out = lighthouse_attention(q, k, v, cfg, documents=documents)
        out.float().square().sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
        q.grad = k.grad = v.grad = None
