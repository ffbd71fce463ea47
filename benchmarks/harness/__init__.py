"""The benchmarks' one harness: device sync and timing (warm-up, medians), peak device memory and
RSS, run metadata (machine, versions, git commit, load) and copy bandwidth, and the JSON +
markdown writer. Every benchmark under benchmarks/ measures and reports through it."""
from .memory import (MemoryWindow, Sampler, fix_malloc_mmap_threshold, read_status, reset_peak,  # noqa: F401
                     trim_heap)
from .metadata import (GiB, ROOT, command_line, command_output, cores, cpu_model, device_name,  # noqa: F401
                       device_slug, git_dirty, git_sha, host_memory_gib, loadavg, nvidia_smi, run_metadata,
                       utc_now, version)
from .process import emit, finish, ranks_parser, run_fresh, start_fresh  # noqa: F401
from .report import json_default, table_header, write_atomic, write_results  # noqa: F401
from .timing import MiB, Timer, copy_bandwidth, last_level_cache_bytes, median_seconds, sync  # noqa: F401
