"""lh-cp: Lighthouse attention and context parallelism for long-context pre-training."""

from lh_cp.api import causal_attention, lighthouse_attention
from lh_cp.ops.attention import attend_selected
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection
from lh_cp.ops.select import select
from lh_cp.version import __version__

__all__ = [
    "__version__",
    "LighthouseConfig",
    "Selection",
    "attend_selected",
    "causal_attention",
    "lighthouse_attention",
    "select",
]
