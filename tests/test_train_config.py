"""Run configs and recipes: typed sections, strict keys, the paper's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_core.registry import get_model_config, list_models
from clip_train.config import (
    RECIPE_DIR,
    RunConfig,
    RunConfigError,
    list_recipes,
    load_run_config,
)

PRODUCTION = ("rn50", "vit-b32", "vit-b16", "vit-l14")


def test_all_recipes_are_bundled_and_load() -> None:
    """Every recipe the issue names exists and names a registered model."""
    assert set(list_recipes()) >= {"tiny", *PRODUCTION, "vit-l14-336"}
    for name in list_recipes():
        cfg = load_run_config(name)
        assert cfg.model.name in list_models(), name


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_recipes_carry_the_paper_numbers(name: str) -> None:
    """Global batch 32,768, 32 epochs, wd 0.2, warmup 2,000, bf16."""
    cfg = load_run_config(name)
    assert cfg.data.global_batch_size == 32768
    assert (cfg.optim.epochs, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (32, 0.2, 2000)
    assert cfg.precision.precision == "bf16" and cfg.infra.use_gpu


#: The paper's Adam settings by image tower (appendix F, common hyperparameters).
PAPER_ADAM = {"resnet": (0.9, 0.999, 1e-8), "vit": (0.9, 0.98, 1e-6)}


@pytest.mark.parametrize("name", [*PRODUCTION, "vit-l14-336"])
def test_recipes_use_the_papers_adam_settings_per_tower(name: str) -> None:
    cfg = load_run_config(name)
    tower = get_model_config(cfg.model.name).vision.type
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == PAPER_ADAM[tower], name
    assert cfg.optim.lr == (4e-4 if cfg.model.name.startswith("ViT-L") else 5e-4)


@pytest.mark.parametrize("name", list_recipes())
def test_gpu_recipes_compile_and_fuse_adamw_cpu_recipes_do_not(name: str) -> None:
    """torch.compile and fused AdamW are on by default where the recipe runs on GPUs; the
    CPU recipes (tiny, demo) keep eager mode and foreach AdamW; the ViT-L recipes shard
    AdamW's state (ZeRO-1)."""
    cfg = load_run_config(name)
    gpu = cfg.infra.use_gpu
    assert cfg.precision.compile is gpu and (cfg.optim.adamw == "fused") is gpu, name
    assert cfg.optim.sharding == ("zero1" if cfg.model.name.startswith("ViT-L") else "none")
    with pytest.raises(RunConfigError, match=r"optim\.sharding"):
        load_run_config(name, ["optim.sharding=zero3"])


def test_per_worker_batch_is_derived_from_the_worker_count() -> None:
    """32,768 over 256 GPUs = 128 each; over 64 GPUs with 2 accumulation steps = 256."""
    assert load_run_config("vit-l14").per_worker_batch == 128
    cfg = load_run_config("vit-b32", ["infra.num_workers=64", "optim.accum_steps=2"])
    assert cfg.per_worker_batch == 256


def test_vit_l14_336_fine_tunes_one_epoch_from_a_checkpoint() -> None:
    """The @336 recipe starts from a vit-l14 checkpoint and trains one epoch at 336 px."""
    cfg = load_run_config("vit-l14-336")
    assert cfg.model.name == "ViT-L-14-336" and cfg.model.init_from
    assert cfg.optim.epochs == 1


def test_unknown_keys_and_bad_values_are_errors() -> None:
    """Typos never fall back to defaults; impossible batch splits are refused."""
    with pytest.raises(RunConfigError, match="unknown key"):
        load_run_config("tiny", ["optim.learning_rate=0.1"])
    with pytest.raises(RunConfigError, match="unknown key"):
        load_run_config("tiny", ["extra.x=1"])
    with pytest.raises(RunConfigError, match="divisible"):
        load_run_config("tiny", ["data.global_batch_size=127"])
    with pytest.raises(RunConfigError, match="precision"):
        load_run_config("tiny", ["precision.precision=fp8"])
    with pytest.raises(RunConfigError, match="compile_backend"):
        load_run_config("tiny", ["precision.compile_backend=tensorrt"])
    assert (
        load_run_config("tiny", ["precision.compile=true"]).precision.compile_backend == "inductor"
    )
    with pytest.raises(RunConfigError, match="not a file and not a recipe"):
        load_run_config("no-such-recipe")


def test_config_round_trips_and_flattens_stably() -> None:
    """to_dict/from_dict round-trip; flat params use section.key names."""
    cfg = load_run_config("tiny", ["optim.lr=0.001", "infra.num_workers=4"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    flat = cfg.flat_params()
    assert flat["optim.lr"] == "0.001" and flat["infra.num_workers"] == "4"
    assert flat["seed"] == "0"


def test_gpu_type_is_pinned_and_checked_against_the_precision() -> None:
    """Recipes pin A100s (bf16); V100s need fp16; the pin reaches Ray's ScalingConfig."""
    from clip_train.loop import JobSpec
    from clip_train.run import _trainer

    for name in PRODUCTION:
        assert load_run_config(name).infra.accelerator_type == "A100", name
    with pytest.raises(RunConfigError, match="no bf16"):
        load_run_config("vit-l14", ["infra.accelerator_type=V100"])
    v100 = load_run_config("vit-l14", ["infra.accelerator_type=V100", "precision.precision=fp16"])
    with pytest.raises(RunConfigError, match="use_gpu"):
        load_run_config("tiny", ["infra.accelerator_type=A100"])
    job = JobSpec({}, [], 77, steps_per_epoch=1, total_steps=1, tracking=None)
    trainer = _trainer(v100, job, dataset=None)
    scaling = trainer.scaling_config
    assert (scaling.accelerator_type, scaling.num_workers, scaling.use_gpu) == ("V100", 256, True)


def test_speed_flags_are_checked_and_reach_the_model_and_optimiser() -> None:
    """optim.adamw and precision.channels_last (bench/speed.py's optimisations) as run config."""
    import torch

    from clip_core import create_model
    from clip_train.optim import build_optimizer
    from clip_train.run import plan

    with pytest.raises(RunConfigError, match=r"optim\.adamw"):
        load_run_config("tiny", ["optim.adamw=apex"])
    cfg = load_run_config("tiny", ["optim.adamw=fused", "precision.channels_last=true"])
    with pytest.raises(RunConfigError, match="ResNet image towers"):
        plan(cfg)  # tiny is a ViT: refused before any data is read
    model = create_model("tiny-rn")
    model.set_channels_last(cfg.precision.channels_last)
    conv = model.visual.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(model, 1e-3, 0.2, implementation=cfg.optim.adamw)
    assert opt.defaults["fused"] and not opt.defaults["foreach"]
    with pytest.raises(ValueError, match="ResNet"):
        create_model("tiny-vit").set_channels_last(True)


def test_exponent_numbers_are_floats_in_overrides_and_files(tmp_path: Path) -> None:
    """``1e-3`` is a number (YAML 1.2, as DVC writes params), not PyYAML 1.1's string."""
    cfg = load_run_config("tiny", ["optim.lr=1e-3", "optim.weight_decay=2E-1"])
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.2
    recipe = tmp_path / "run.yaml"
    text = (RECIPE_DIR / "tiny.yaml").read_text(encoding="utf-8")
    recipe.write_text(text.replace("lr: 5.0e-4", "lr: 3e-4"), encoding="utf-8")
    assert load_run_config(str(recipe)).optim.lr == 0.0003
    assert load_run_config("tiny", ["infra.run_name=1e3x"]).infra.run_name == "1e3x"
