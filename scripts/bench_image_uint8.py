"""Host time of the decoded image's conversion to uint8 (ldm_deploy/runtime/pipeline.py), before and after the table:

    python scripts/bench_image_uint8.py --batch 1 4 --out uint8.json

"float32 path": what Pipeline.decode did with an fp16 decoder's image (the runner's cast to float32, check_finite,
to_uint8). "fp16 table": image_to_uint8 on the fp16 image as the runner now returns it. Same random 512x512 images,
median of --repeats, on whatever CPU runs it (the host of a GPU machine is the one that matters: it does this work
between the decoder and the caller). Both results are checked equal first.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def main(argv=None) -> int:
    from ldm_deploy.runtime.pipeline import check_finite, image_to_uint8, to_uint8

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    def float32_path(image16):
        image = image16.astype(np.float32)
        check_finite(image, "vae_decoder")
        return to_uint8(image)

    rows = {}
    for batch in args.batch:
        image = (np.random.default_rng(batch).standard_normal((batch, 3, args.size, args.size)) * 0.7
                 ).astype(np.float16)
        np.testing.assert_array_equal(image_to_uint8(image), float32_path(image))
        rows[str(batch)] = {"float32_path_ms": _median_ms(lambda: float32_path(image), args.repeats),
                            "fp16_table_ms": _median_ms(lambda: image_to_uint8(image), args.repeats)}
        print(f"B={batch}: {rows[str(batch)]}", flush=True)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    result = {"machine": {"cpu": names[0] if names else platform.machine(), "cores": len(names) or None,
                          "python": platform.python_version(),
                          "numpy": np.__version__}, "size": args.size, "repeats": args.repeats, "batches": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
