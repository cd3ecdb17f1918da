"""配置测试：默认值与规格书一致；每种非法输入都抛出点名字段的 ValueError。"""

import dataclasses
import re

import pytest

from functional_lm.config import (
    MODEL_BOUNDS,
    PRESETS,
    TRAINING_BOUNDS,
    Bounds,
    ModelConfig,
    TrainingConfig,
    get_preset,
)


def test_model_config_defaults_match_specification():
    cfg = ModelConfig()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (512, 12, 8, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_seq_len) == (2048, 151936, 512)
    assert cfg.rope_theta == 1e6 and cfg.norm_eps == 1e-6 and cfg.dropout == 0.0
    assert cfg.qkv_bias is True and cfg.tie_word_embeddings is True
    assert cfg.head_dim == 64 and cfg.num_queries_per_kv == 4


def test_training_config_defaults_match_specification():
    tc = TrainingConfig()
    assert (tc.batch_size, tc.learning_rate, tc.weight_decay, tc.warmup_steps) == (8, 3e-4, 0.01, 500)
    assert (tc.num_epochs, tc.gradient_clip, tc.alpha, tc.temperature) == (3, 1.0, 0.5, 2.0)
    assert (tc.log_interval, tc.eval_interval, tc.save_interval) == (50, 500, 1000)
    assert isinstance(tc.checkpoint_dir, str) and tc.checkpoint_dir
    assert (tc.seed, tc.split_seed) == (0, 0)  # 划分有自己的种子，缺省与 seed 一样是 0


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().hidden_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainingConfig().alpha = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"hidden_size": 500}, "hidden_size"),  # 500 % 8 != 0
        ({"num_kv_heads": 3}, "num_kv_heads"),  # 8 % 3 != 0
        ({"hidden_size": 24, "num_heads": 8, "num_kv_heads": 2}, "head_dim"),  # head_dim = 3 为奇数
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_size": -512}, "hidden_size"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"max_seq_len": -1}, "max_seq_len"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_kv_heads": 0}, "num_kv_heads"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"norm_eps": -1e-6}, "norm_eps"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_layers": 12.0}, "num_layers"),
    ],
)
def test_model_config_rejects_invalid(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**changes)


def test_model_config_error_names_the_value():
    with pytest.raises(ValueError, match=r"hidden_size=500.*num_heads=8"):
        ModelConfig(hidden_size=500)
    with pytest.raises(ValueError, match=r"num_heads=8.*num_kv_heads=3"):
        ModelConfig(num_kv_heads=3)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"weight_decay": -0.01}, "weight_decay"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"gradient_clip": 0.0}, "gradient_clip"),
        ({"log_interval": 0}, "log_interval"),
        ({"eval_interval": -5}, "eval_interval"),
        ({"save_interval": 0}, "save_interval"),
        ({"checkpoint_dir": ""}, "checkpoint_dir"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"max_steps": -1}, "max_steps"),
        ({"keep_last": 0}, "keep_last"),
        ({"divergence": "kl"}, "divergence"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
        ({"eval_batches": 0}, "eval_batches"),
        ({"bf16": 1}, "bf16"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"split_seed": -1}, r"split_seed must be in \[0, 4294967295\]"),
        ({"split_seed": 1.0}, "split_seed must be an int"),
    ],
)
def test_training_config_rejects_invalid(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**changes)


def test_alpha_bounds_are_inclusive():
    assert TrainingConfig(alpha=0.0).alpha == 0.0
    assert TrainingConfig(alpha=1.0).alpha == 1.0


def test_presets():
    assert get_preset("student-123m") == ModelConfig()
    tiny = get_preset("tiny")
    assert tiny.num_layers == 2 and tiny.hidden_size <= 64
    assert set(PRESETS) >= {"student-123m", "tiny"}
    with pytest.raises(ValueError, match="unknown preset 'nope'.*student-123m"):
        get_preset("nope")


def test_replace_revalidates():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig().replace(num_kv_heads=3)
    assert ModelConfig().replace(num_layers=2).num_layers == 2


def test_divergence_names_match_the_loss_module():
    from functional_lm.config import DIVERGENCE_NAMES
    from functional_lm.losses import DIVERGENCES

    assert DIVERGENCE_NAMES == DIVERGENCES


# ---------------------------------------------------------------- 每个数值字段：有限且在范围内
def _numeric_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if f.type in ("int", "float")]


def test_every_numeric_field_has_bounds():
    # 新增的数值字段必须在表里登记范围，否则命令行的早期检查与 __post_init__ 都不会管它。
    assert sorted(MODEL_BOUNDS) == sorted(_numeric_fields(ModelConfig))
    assert sorted(TRAINING_BOUNDS) == sorted(_numeric_fields(TrainingConfig))


_FLOATS = [(cls, f.name) for cls in (ModelConfig, TrainingConfig) for f in dataclasses.fields(cls) if f.type == "float"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("cls, name", _FLOATS, ids=[f"{c.__name__}.{n}" for c, n in _FLOATS])
def test_every_float_field_refuses_non_finite_values(cls, name, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must be .*, got {value!r}"):
        cls(**{name: value})


@pytest.mark.parametrize("seed, ok", [(-1, False), (0, True), (2**32 - 1, True), (2**32, False)])
def test_seed_range(seed, ok):
    if ok:
        assert TrainingConfig(seed=seed).seed == seed
    else:
        with pytest.raises(ValueError, match=r"TrainingConfig\.seed must be in \[0, 4294967295\]"):
            TrainingConfig(seed=seed)


@pytest.mark.parametrize("bounds, good, bad, text", [
    (Bounds(0, 1, low_open=True), [1, 0.5, 1e-9], [0, -0.1, 1.0001, float("nan")], "in (0, 1]"),
    (Bounds(0, 1, high_open=True), [0, 0.999], [1, -1e-9], "in [0, 1)"),
    (Bounds(0, low_open=True), [1e-30, 1e30], [0, float("inf")], "a finite number > 0"),
    (Bounds(0, integer=True, note="(0 = off)"), [0, 7], [-1], ">= 0 (0 = off)"),
])
def test_bounds_check_and_describe(bounds, good, bad, text):
    assert bounds.describe() == text
    for value in good:
        assert bounds.check("x", value) == value
    for value in bad:
        with pytest.raises(ValueError, match=re.escape(f"x must be {text}, got {value!r}")):
            bounds.check("x", value)


def test_bounds_check_types():
    with pytest.raises(ValueError, match=r"x must be an int, got 2\.0 \(float\)"):
        Bounds(0, integer=True).check("x", 2.0)
    with pytest.raises(ValueError, match=r"x must be a number, got True \(bool\)"):
        Bounds(0).check("x", True)
    with pytest.raises(ValueError, match=r"x must be a number, got '1' \(str\)"):
        Bounds(0).check("x", "1")
