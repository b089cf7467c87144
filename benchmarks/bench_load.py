"""Load time of the embedded default model: cold (GGUF dequantisation) vs cached (safetensors).

Run: ``python benchmarks/bench_load.py``. Library imports are timed separately, so both numbers
are the time spent inside ``load_model`` in an already-warm Python process.
"""

import statistics
import tempfile
import time

t0 = time.perf_counter()
import transformer_lens.model_bridge  # noqa: E402,F401
import transformers  # noqa: E402,F401

from gimlens.models import load_model  # noqa: E402

print(f"imports:           {time.perf_counter() - t0:6.2f} s")


def timed(**kwargs) -> float:
    start = time.perf_counter()
    load_model(**kwargs)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gimlens-bench-") as cache:
        cold = timed(cache_dir=cache)
        cached = statistics.median(timed(cache_dir=cache) for _ in range(3))
    print(f"cold load:         {cold:6.2f} s  (dequantise the GGUF, write the cache)")
    print(f"cached load:       {cached:6.2f} s  (median of 3)")
    print(f"cold / cached:     {cold / cached:6.1f} x")


if __name__ == "__main__":
    main()
