"""lh-cp: Lighthouse attention and context parallelism for long-context pre-training."""

from lh_cp.api import causal_attention, lighthouse_attention
from lh_cp.attention import attend_selected
from lh_cp.config import LighthouseConfig
from lh_cp.select import Selection, select

__all__ = [
    "LighthouseConfig",
    "Selection",
    "attend_selected",
    "causal_attention",
    "lighthouse_attention",
    "select",
]
__version__ = "0.1.0"
