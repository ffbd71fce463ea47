"""calm_fast: CALM model merging with fused CPU / CUDA / Triton kernels."""
from . import ops, reference
from ._extension import NATIVE, NATIVE_CUDA
from .baselines import DataFreeConfig
from .calm import CALMConfig, CALMReport
from .clip_tasks import CLIPTasks, evaluate_clip, merge_clip
from .merge import METHODS, MergeResult, check, merge, replay, report_json

__version__ = "0.1.0"
__all__ = ["ops", "reference", "NATIVE", "NATIVE_CUDA", "merge", "check", "replay", "report_json",
           "MergeResult", "CALMConfig", "CALMReport", "DataFreeConfig", "METHODS", "__version__",
           "CLIPTasks", "merge_clip", "evaluate_clip"]
