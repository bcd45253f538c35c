"""Host time of the decoded image's conversion to uint8 (ldm_deploy/runtime/pipeline.py), before and after the table:

    python scripts/bench_image_uint8.py --batch 1 4 --out uint8.json

"float32 path": what Pipeline.decode did with an fp16 decoder's image (the runner's cast to float32, check_finite,
to_uint8). "fp16 table": image_to_uint8 on the fp16 image as the runner now returns it. Same random 512x512 images,
median of --repeats, on whatever CPU runs it (the host of a GPU machine is the one that matters: it does this work
between the decoder and the caller). Both results are checked equal first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


FORMAT = "ldm-deploy-image-uint8"   # the --out file's "format"


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def main(argv=None) -> int:
    from ldm_deploy.bench.machine import machine_info
    from ldm_deploy.fileio import check_out_file, write_json
    from ldm_deploy.runtime.pipeline import check_finite, image_to_uint8, to_uint8

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    if args.out:   # an earlier result of this script is replaced, nothing else
        check_out_file(args.out, FORMAT)

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
    result = {"format": FORMAT, "machine": machine_info(), "size": args.size, "repeats": args.repeats,
              "batches": rows}
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    from ldm_deploy.errors import script_exit

    sys.exit(script_exit(main, "bench_image_uint8"))   # e.g. --out names a file of the user's: one line, nothing written
