"""Upload and restore-path download through S3Store against raw boto3, on one local moto server.

    .venv/bin/python bench/bench_s3.py [--sizes 50,200] [--runs 3]

Not a test: it prints a markdown table of medians (seconds and MiB/s) and the ratio
S3Store / boto3 (time; below 1.0 means S3Store is faster). Both sides talk to the same moto server,
run in a separate process so client and server do not share a GIL, in the same run, alternating
which goes first. boto3 runs with its defaults (``upload_file``/``download_file``: 8 MiB parts, 10
threads, CRC32 checksums); S3Store with its defaults (8 MiB parts, 4 threads, SHA-256 checksums,
plus its extra requests: the conditional-write probe once, a HEAD before a multipart upload, a
HEAD after every upload, a HEAD before every download). moto keeps objects in memory, so absolute
numbers say little about real S3; the ratio shows the overhead of S3Store's own work.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,200", help="MiB, comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from s3server import aws_env

    os.environ.update(aws_env())
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "s3server.py")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        endpoint = server.stdout.readline().strip()
        rows = run(endpoint, sizes, args.runs)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print_table(rows, args.runs)


def run(endpoint: str, sizes: list[int], runs: int) -> list[tuple[str, str, float, float]]:
    import boto3
    import structlog
    from botocore.config import Config

    from s3server import moto_s3_config
    from watcherd.config import StoreURL
    from watcherd.store.s3 import S3Store

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                        config=Config(s3={"addressing_style": "path"}))
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    store = S3Store(StoreURL("s3", bucket=bucket, prefix="store"),
                    moto_s3_config(endpoint, max_attempts=8))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        # Warm-up, not timed: connection pools, the conditional-write probe, moto's first requests.
        warm = Path(tmp, "warm.bin")
        warm.write_bytes(os.urandom(9 * MiB))
        store.upload("k/bundles/warm.bundle", warm, size=9 * MiB,
                     sha256=hashlib.sha256(warm.read_bytes()).hexdigest())
        store.download("k/bundles/warm.bundle", Path(tmp, "warm.out"))
        s3.upload_file(str(warm), bucket, "raw/warm")
        s3.download_file(bucket, "raw/warm", str(Path(tmp, "warm.out")))
        for size_mib in sizes:
            src = Path(tmp, f"{size_mib}.bin")
            with open(src, "wb") as f:
                for _ in range(size_mib):
                    f.write(os.urandom(MiB))
            size = src.stat().st_size
            sha = hashlib.sha256(src.read_bytes()).hexdigest()
            times: dict[str, list[float]] = {k: [] for k in ("up_w", "up_b", "down_w", "down_b")}
            for i in range(runs):
                name = f"k/bundles/{size_mib}-{i}.bundle"
                raw_key = f"raw/{size_mib}-{i}.bundle"
                out_w, out_b = Path(tmp, "out-w"), Path(tmp, "out-b")

                def up_w() -> None:
                    store.upload(name, src, size=size, sha256=sha)

                def up_b() -> None:
                    s3.upload_file(str(src), bucket, raw_key)

                def down_w() -> None:
                    store.download(name, out_w)

                def down_b() -> None:
                    s3.download_file(bucket, raw_key, str(out_b))

                pairs = [(up_w, "up_w"), (up_b, "up_b")]
                for fn, key in pairs if i % 2 == 0 else reversed(pairs):
                    times[key].append(timed(fn))
                pairs = [(down_w, "down_w"), (down_b, "down_b")]
                for fn, key in pairs if i % 2 == 0 else reversed(pairs):
                    times[key].append(timed(fn))
                for out in (out_w, out_b):
                    assert out.stat().st_size == size
                assert hashlib.sha256(out_w.read_bytes()).hexdigest() == sha
                store.delete(name)
                s3.delete_object(Bucket=bucket, Key=raw_key)
            rows.append((f"{size_mib} MiB", "upload", statistics.median(times["up_w"]),
                         statistics.median(times["up_b"])))
            rows.append((f"{size_mib} MiB", "download", statistics.median(times["down_w"]),
                         statistics.median(times["down_b"])))
            src.unlink()
    store.close()
    return rows


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def print_table(rows: list[tuple[str, str, float, float]], runs: int) -> None:
    import boto3
    import botocore

    print(f"S3Store vs boto3 against a local moto server (median of {runs} runs; "
          f"Python {platform.python_version()}, boto3 {boto3.__version__}, "
          f"botocore {botocore.__version__}, {os.cpu_count()} CPUs)\n")
    print("| size | operation | S3Store | boto3 | ratio (S3Store / boto3) |")
    print("|---|---|---|---|---|")
    for label, op, ours, theirs in rows:
        mib = float(label.split()[0])
        print(f"| {label} | {op} | {ours:.2f} s ({mib / ours:.0f} MiB/s) | "
              f"{theirs:.2f} s ({mib / theirs:.0f} MiB/s) | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
