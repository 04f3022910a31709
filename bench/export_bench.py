"""Benchmark (not a test): export throughput of a ~1 GB published run to and from S3.

Generates a run of Parquet and binary files in a temporary folder, publishes it (sha256 of every
file), starts SeaweedFS on loopback (the same server the tests use) and exports the run
local -> S3 and back, with and without reading the copy back for verification. Files are
larger than pyarrow's multipart part size, so this also checks multipart uploads end to end.
Prints MB/s (10^6 bytes per second) for each, side by side.

    .venv/bin/python bench/export_bench.py --gb 1.0
    .venv/bin/python bench/export_bench.py --gb 0.25 --threads 1,4,8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for cxrmem and bench.s3server

from bench.s3server import S3Server, find_weed  # noqa: E402
from cxrmem import publish  # noqa: E402
from cxrmem.storage import Store

FILE_BYTES = 128 << 20  # several multipart parts per file


def generate_run(prefix: Path, total_bytes: int, seed: int = 0) -> None:
    """Half Parquet (random float step norms, incompressible), half opaque binary, plus small outputs."""
    rng = np.random.default_rng(seed)
    written, index = 0, 0
    while written < total_bytes:
        size = min(FILE_BYTES, total_bytes - written)
        if index % 2 == 0:
            rows = size // 8 // 50
            table = pa.table({f"t{t:02d}": rng.random(rows) for t in range(50)})
            path = prefix / f"scores/part-{index:03d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, compression="none")
        else:
            path = prefix / f"figures/blob-{index:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.bytes(size))
        written += path.stat().st_size
        index += 1
    (prefix / "summary.json").write_text('{"bench": true}\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the generated run in GB (2^30 bytes)")
    parser.add_argument("--threads", default="8", help="comma-separated storage.transfer_threads values to compare")
    parser.add_argument("--workdir", default=None, help="folder for the run and the server's data (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        start = time.perf_counter()
        generate_run(run, int(args.gb * (1 << 30)))
        print(f"generated {sum(f.stat().st_size for f in run.rglob('*') if f.is_file()) / 1e6:.0f} MB "
              f"in {time.perf_counter() - start:.1f} s")

        server = S3Server(data_dir=tmp / "seaweedfs", weed=find_weed())
        server.start()
        try:
            server.client().create_bucket(Bucket="bench")
            rows = []
            for threads in [int(t) for t in args.threads.split(",")]:
                cfg = server.storage_cfg(access_key_id=server.access_key, secret_access_key=server.secret_key,
                                         max_attempts=3, transfer_threads=threads)
                start = time.perf_counter()
                manifest = publish.publish_manifest(Store.from_config(cfg), str(run), "bench", {}, extra=None)
                seconds = time.perf_counter() - start
                rows.append((threads, "publish (sha256) local", manifest["total_bytes"], seconds))
                for verify in (False, True):
                    remote = f"s3://bench/t{threads}-v{int(verify)}"
                    result = publish.export_run(Store.from_config(cfg), str(run), remote, verify=verify)
                    rows.append((threads, f"export local -> s3{' + verify' if verify else ''}", result["bytes"], result["seconds"]))
                back = tmp / f"back-t{threads}"
                result = publish.export_run(Store.from_config(cfg), f"s3://bench/t{threads}-v1", str(back))
                rows.append((threads, "export s3 -> local + verify", result["bytes"], result["seconds"]))
                Store().delete_tree(str(back))
                assert publish.verify_run(Store.from_config(cfg), f"s3://bench/t{threads}-v1")["ok"]
        finally:
            server.stop()

    print(f"\n{'threads':>7}  {'operation':<30} {'MB':>8} {'s':>7} {'MB/s':>7}")
    for threads, what, size, seconds in rows:
        print(f"{threads:>7}  {what:<30} {size / 1e6:>8.0f} {seconds:>7.1f} {size / 1e6 / seconds:>7.1f}")
    print(f"\nhost: {os.cpu_count()} CPUs; SeaweedFS on loopback shares them with this process")


if __name__ == "__main__":
    main()
