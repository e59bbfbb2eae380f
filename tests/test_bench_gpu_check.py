"""bench/gpu_check.sh and bench.gpu_check on a machine without a GPU, and their arithmetic.

The script is run for real as a subprocess with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``, so
the same path is taken on a GPU machine): it must exit 0, print one skip line per CUDA part
and write a JSON holding the CPU smoke measurements. The MFU and matmul-peak arithmetic is
checked with known numbers and a fake clock, the JUnit summary with a hand-written report,
and the analytic FLOPs per pair of ViT-B/32 against an independent estimate from the model's
parameter counts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.flops import forward_flops, train_flops_per_pair
from clip_core.config import ViTConfig
from clip_core.model import CLIP
from clip_core.registry import get_model_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
EXPECTED_KEYS = {
    "schema",
    "date",
    "complete",
    "cpu_smoke",
    "cuda",
    "torch",
    "cuda_version",
    "arch_list",
    "device",
    "device_check",
    "tests",
    "model",
    "train_flops_per_pair",
    "peak",
    "runs",
    "skipped",
    "elapsed_s",
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    """``bash bench/gpu_check.sh OUT --cpu-smoke`` with CUDA hidden: (rc, output, OUT)."""
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_BUDGET_S": "240"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    yield proc.returncode, proc.stdout + proc.stderr, out


def test_script_without_cuda_exits_0_and_prints_a_skip_line_per_cuda_part(
    smoke_run: tuple[int, str, Path],
) -> None:
    rc, output, _ = smoke_run
    assert rc == 0, output
    skips = [line for line in output.splitlines() if line.startswith(gpu_check.SKIP_PREFIX)]
    assert len(skips) == 3, output  # the CUDA tests, the matmul peak, the training runs
    assert any("CUDA tests" in line for line in skips)
    assert any("matmul peak" in line for line in skips)
    assert any("pairs/s and MFU" in line for line in skips)
    assert "Traceback" not in output


def test_script_writes_the_json_with_the_cpu_smoke_figures(
    smoke_run: tuple[int, str, Path],
) -> None:
    _, _, out = smoke_run
    data = json.loads(out.read_text())
    assert set(data) >= EXPECTED_KEYS, sorted(EXPECTED_KEYS - set(data))
    assert data["cuda"] is False and data["cpu_smoke"] is True and data["complete"] is True
    assert data["tests"]["ran"] is False and "no CUDA" in data["tests"]["reason"]
    assert data["arch_list"] == [] and data["device"] == "cpu"
    assert data["torch"] == torch.__version__
    assert data["train_flops_per_pair"] == train_flops_per_pair(get_model_config("tiny-vit"))
    peak = data["peak"]
    assert peak["device"] == "cpu" and peak["dtype"] == "bfloat16" and peak["tflops"] > 0
    runs = data["runs"]
    assert [(r["batch"], r["compile"]) for r in runs] == [(4, False), (8, False)]
    for r in runs:
        assert r["error"] is None, r
        assert r["pairs_per_s"] > 0 and r["step_ms"] > 0 and len(r["step_ms_all"]) == 2
        assert math.isclose(r["pairs_per_s"], r["batch"] / (r["step_ms"] / 1e3), rel_tol=1e-9)
        expected = gpu_check.step_mfu(
            r["batch"], r["step_ms"], data["train_flops_per_pair"], peak["best_flops_per_s"]
        )
        assert math.isclose(r["mfu"], expected, rel_tol=1e-9)
    assert not out.with_name(out.name + ".tmp").exists()


def test_without_cuda_and_without_smoke_nothing_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "plain.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["cuda"] is False and data["runs"] == [] and data["complete"] is True
    assert data["model"] == "ViT-B-32" and data["settings"]["batches"] == [256, 512]
    assert data["settings"]["compile"] == ["off", "on"]
    assert data["peak"] == {"datasheet_flops_per_s": None}
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(gpu_check.SKIP_PREFIX) for line in lines) == 2


def test_mfu_of_a_step_is_flops_per_second_over_the_peak() -> None:
    # 512 pairs in 250 ms = 2048 pairs/s; x 1e9 FLOPs = 2.048 TFLOP/s; half of 4.096
    assert gpu_check.pairs_per_second(512, 250.0) == 2048.0
    assert gpu_check.step_mfu(512, 250.0, 10**9, 4.096e12) == pytest.approx(0.5, rel=1e-12)
    # the 45% target: ViT-B/32 (44.3 GFLOPs/pair) at ~10,000 pairs/s on 989 TFLOP/s
    flops = train_flops_per_pair(get_model_config("ViT-B-32"))
    assert gpu_check.step_mfu(10_000, 1000.0, flops, 989e12) == pytest.approx(
        10_000 * flops / 989e12, rel=1e-12
    )
    assert 0.44 < gpu_check.step_mfu(10_000, 1000.0, flops, 989e12) < 0.46


def test_matmul_peak_is_two_n_cubed_over_the_best_time() -> None:
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0])  # rep times 0.5 s, 0.25 s, 1.0 s
    peak = gpu_check.measure_matmul_peak(
        torch.device("cpu"), 32, 3, dtype=torch.float32, warmup=0, timer=lambda: next(ticks)
    )
    assert gpu_check.matmul_flops(8192) == 2 * 8192**3 == 1_099_511_627_776
    assert peak.best_flops_per_s == 2 * 32**3 / 0.25
    assert peak.median_flops_per_s == 2 * 32**3 / 0.5
    assert peak.best_ms == 250.0 and peak.n == 32 and peak.dtype == "float32"


def test_vit_b32_flops_per_pair_match_two_flops_per_parameter_per_token() -> None:
    """Independent estimate: each weight of a tower does one multiply-add (2 FLOPs) per token
    it sees: the ViT blocks on 50 tokens (49 patches + class), the patch conv on 49 patches,
    the text blocks on 77 tokens, the projections on one token each; embeddings are lookups.
    It leaves out attention scores (Q K^T and A V: 4 T^2 W per layer, ~1.6% of ViT-B/32) and
    counts biases and norm gains as multiply-adds (~0.1%), so the analytic count must lie
    0-3% above it."""
    cfg = get_model_config("ViT-B-32")
    assert isinstance(cfg.vision, ViTConfig)
    with torch.device("meta"):
        model = CLIP(cfg)
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        prefix = ".".join(name.split(".")[:2]) if name.startswith("visual.") else name
        prefix = "transformer" if name.startswith("transformer.") else prefix
        sizes[prefix] = sizes.get(prefix, 0) + p.numel()
    grid = (cfg.vision.image_size // cfg.vision.patch_size) ** 2  # 49
    estimate = 2 * (
        sizes["visual.transformer"] * (grid + 1)
        + sizes["visual.conv1"] * grid
        + sizes["transformer"] * cfg.text.context_length
        + sizes["visual.proj"]
        + sizes["text_projection"]
    )
    analytic = forward_flops(cfg)
    assert 1.0 < analytic / estimate < 1.03, (analytic, estimate)
    assert train_flops_per_pair(cfg) == 3 * analytic
    assert 44e9 < train_flops_per_pair(cfg) < 45e9  # docs/scaling.md: 14.8 GFLOPs forward


def test_junit_summary_counts_each_outcome(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" time="2.5">'
        '<testcase classname="tests.test_train_cuda" name="test_a" time="1"/>'
        '<testcase classname="tests.test_train_cuda" name="test_b" time="1">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_train_cuda" name="test_c" time="0">'
        '<skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="tests.test_x" name="test_d" time="0.5">'
        '<error message="fixture failed"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_check.summarise_junit(report, rc=1)
    assert (summary["total"], summary["passed"], summary["failed"]) == (4, 1, 1)
    assert (summary["skipped"], summary["errors"], summary["rc"]) == (1, 1, 1)
    assert summary["seconds"] == 2.5
    failed = [c for c in summary["cases"] if c["outcome"] == "failure"]
    assert failed == [
        {"test": "tests.test_train_cuda::test_b", "outcome": "failure", "message": "assert 1 == 2"}
    ]
    missing = gpu_check.summarise_junit(tmp_path / "absent.xml", rc=124)
    assert missing["rc"] == 124 and "no JUnit report" in missing["error"]


def test_output_path_prefers_the_option_then_out_then_bench_results(tmp_path: Path) -> None:
    given = tmp_path / "x.json"
    assert gpu_check.output_path(given, {"OUT": "/elsewhere"}) == given
    assert gpu_check.output_path(None, {"OUT": str(tmp_path)}) == tmp_path / "gpu_check.json"
    assert gpu_check.output_path(None, {}) == ROOT / "bench" / "results" / "gpu_check.json"


@pytest.mark.parametrize(
    "argv", [["--steps", "0"], ["--warmup", "-1"], ["--batches", "0"], ["--model", "nope"]]
)
def test_bad_options_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2
