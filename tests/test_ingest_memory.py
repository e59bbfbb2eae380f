"""Ingest streams: peak memory does not grow with the size of the source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import io, json, resource, sys
import numpy as np
from PIL import Image
from clip_data.ingest import IngestConfig, ingest_records
from clip_data.records import RawRecord
from clip_data.shards import ShardConfig

rows, dest = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
noise = rng.integers(0, 256, (190, 190, 3), dtype=np.uint8)

def records():
    for i in range(rows):
        arr = noise.copy()
        arr[0, 0] = (i % 256, i // 256 % 256, i // 65536)  # unique bytes: no duplicates
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=0)
        yield RawRecord(f"k{i:06d}", buf.getvalue(), b"random noise", "memtest")

# The writer buffers one row group (<= the shard target): bound it at ~8 MB here.
config = IngestConfig(workers=1, shards=ShardConfig(target_shard_bytes=8 << 20, row_group_rows=64))
manifest = ingest_records(records(), dest, config, progress=False)
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"accepted": manifest["counts"]["accepted"], "peak_kib": peak_kib}))
"""


SMALL, LARGE = 200, 1200  # rows


def _run(rows: int, dest: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(rows), str(dest)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    result: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_peak_memory_is_independent_of_source_size(tmp_path: Path) -> None:
    """~100 kB images: 200 rows (~22 MB) vs 1,200 rows (~130 MB) of image bytes.

    With the writer's buffer bounded at ~8 MB (both sources are larger), six times the data
    must not cost proportionally more memory. With an unbounded buffer (one row group, one
    shard) the RSS grows by ~490 MB between the two, 19x the bound below.
    """
    small = _run(SMALL, tmp_path / "small")
    large = _run(LARGE, tmp_path / "large")
    assert small["accepted"] == SMALL and large["accepted"] == LARGE
    source_growth_kib = (LARGE - SMALL) * 190 * 190 * 3 / 1024  # ~103 MB more image bytes
    rss_growth_kib = large["peak_kib"] - small["peak_kib"]
    assert rss_growth_kib < 0.25 * source_growth_kib, (small, large)
    print(f"peak RSS {small['peak_kib']} -> {large['peak_kib']} KiB")
