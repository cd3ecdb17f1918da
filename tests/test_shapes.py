"""运行时类型检查：简短的 TypeCheckError 消息，以及 ``typecheck`` 开关的两种用法。"""

import traceback

import pytest
import torch
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

import functional_lm
from functional_lm import ModelConfig, forward, init_params
from functional_lm.layers import rms_norm
from functional_lm.shapes import Float, Tensor, _short_message, typecheck, typecheck_enabled, typechecked


@pytest.fixture(autouse=True)
def _checking_on():
    """每个测试都从“检查开启”开始，结束后恢复，免得一个失败的测试把开关留在关闭状态。"""
    typecheck(True)
    yield
    typecheck(True)


@pytest.fixture(scope="module")
def default_model():
    """默认 123M 配置（146 个参数张量）：完整的 jaxtyping 消息会把它们逐行打印出来（约 160 行）。"""
    cfg = ModelConfig()
    return cfg, init_params(cfg)


def _raised(fn, *args):
    with pytest.raises(TypeCheckError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------- 简短消息
def test_default_config_shape_error_is_short(default_model):
    cfg, params = default_model
    assert len(params) == 146
    ids = torch.zeros(2, 3, 4, dtype=torch.long)
    error = _raised(forward, params, ids, cfg)
    assert str(error).splitlines() == [
        "functional_lm.models.decoder.forward: argument 'input_ids' does not match its annotation",
        "  actual:   i64[2,3,4]",
        "  expected: Integer[Tensor, 'b t']",
    ]
    # 对照：不经我们的包装，jaxtyping 原始消息会列出全部 163 个张量（约 10 KB）。
    raw = _raised(jaxtyped(typechecker=beartype)(forward.__wrapped__), params, ids, cfg)
    assert len(str(raw)) > 5000 and len(str(raw).splitlines()) > 150
    assert "model.layers.11.mlp.up_proj.weight" in str(raw)


def test_default_config_traceback_does_not_chain_the_long_message(default_model):
    cfg, params = default_model
    error = _raised(forward, params, torch.zeros(2, 3, 4, dtype=torch.long), cfg)
    assert error.__cause__ is None and error.__suppress_context__
    printed = "".join(traceback.format_exception(error))
    assert "Called with parameters" not in printed and "model.layers.0" not in printed
    assert len(printed) < 1500


def test_message_names_argument_shapes_and_bound_dimensions():
    error = _raised(rms_norm, torch.randn(2, 5), torch.ones(4), 1e-6)
    lines = str(error).splitlines()
    assert lines[:3] == [
        "functional_lm.layers.rms_norm: argument 'weight' does not match its annotation",
        "  actual:   f32[4]",
        "  expected: Float[Tensor, 'd']",
    ]
    assert len(lines) == 4 and lines[3].startswith("  dimensions bound so far: ")
    assert "d=5" in lines[3].split(": ", 1)[1].split(", ")


@typechecked
def _drops_a_column(x: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
    return x[:, :-1]


def test_return_value_error_is_short():
    error = _raised(_drops_a_column, torch.zeros(2, 3))
    assert str(error).splitlines() == [
        "test_shapes._drops_a_column: return value does not match its annotation",
        "  actual:   f32[2,2]",
        "  expected: Float[Tensor, 'b d']",
        "  dimensions bound so far: b=2, d=3",
    ]


@typechecked
def _normalises_with_wrong_weight(x: Float[Tensor, "b d"]) -> Float[Tensor, "b d"]:
    return rms_norm(x, torch.ones(7), 1e-6)


def test_error_inside_a_checked_function_names_the_inner_function():
    error = _raised(_normalises_with_wrong_weight, torch.zeros(2, 3))
    message = str(error)
    assert message.startswith("functional_lm.layers.rms_norm: argument 'weight'")
    assert "f32[7]" in message and "d=3" in message and "_normalises_with_wrong_weight" not in message


def test_unexpected_format_falls_back_to_cutting_before_the_parameter_dump():
    dump = "{" + ", ".join(f"'k{i}': f32[512]" for i in range(500)) + "}"
    message = f"Something jaxtyping might say one day about f.\n-----\nCalled with parameters: {dump}"
    assert _short_message(message) == "Something jaxtyping might say one day about f.\n-----"
    assert len(_short_message("x" * 5000)) == 800


def test_long_actual_value_is_clipped():
    message = (
        "Type-check error whilst checking the parameters of m.f.\n"
        "The problem arose whilst typechecking parameter 'p'.\n"
        f"Actual value: {{\n  {'x' * 1000}\n}}\n"
        "Expected type: <class 'Float[Tensor, 'd']'>.\n"
        "----------------------\n"
        "Called with parameters: {'p': ...}\n"
    )
    lines = _short_message(message).splitlines()
    assert lines[0] == "m.f: argument 'p' does not match its annotation"
    assert lines[1].startswith("  actual:   { xxx") and lines[1].endswith("…") and len(lines[1]) <= 212
    assert lines[2] == "  expected: Float[Tensor, 'd']"


# ---------------------------------------------------------------- typecheck 开关
def _broadcastable_wrong_shape():
    """形状注解不符、但 torch 能广播的调用：检查开启时是 TypeCheckError，关闭时正常返回。"""
    return rms_norm(torch.randn(2, 5), torch.ones(1), 1e-6)


def test_plain_call_switches_checking_off_and_on():
    setting = typecheck(False)
    assert not typecheck_enabled()
    assert _broadcastable_wrong_shape().shape == (2, 5)
    assert repr(setting) == "typecheck(False)"
    typecheck(True)
    assert typecheck_enabled()
    with pytest.raises(TypeCheckError, match="weight"):
        _broadcastable_wrong_shape()


def test_with_block_restores_the_previous_setting():
    with typecheck(False):
        assert not typecheck_enabled()
        assert _broadcastable_wrong_shape().shape == (2, 5)
        with typecheck(True):
            with pytest.raises(TypeCheckError):
                _broadcastable_wrong_shape()
        assert not typecheck_enabled()
    assert typecheck_enabled()
    with pytest.raises(TypeCheckError):
        _broadcastable_wrong_shape()


def test_with_block_restores_after_an_exception():
    with pytest.raises(KeyError):
        with typecheck(False):
            raise KeyError("boom")
    assert typecheck_enabled()


def test_typecheck_is_exported_from_the_package():
    assert functional_lm.typecheck is typecheck
    assert functional_lm.typecheck_enabled is typecheck_enabled
    assert {"typecheck", "typecheck_enabled"} <= set(functional_lm.__all__)
