"""MoE 专家的两种键布局：发布的检查点逐专家存放，transformers 5 写出融合的张量；参数字典只保留融合的一种。

    逐专家（Qwen3-30B-A3B、DeepSeek-V3 等发布的检查点）：
        model.layers.{i}.mlp.experts.{j}.gate_proj.weight (f, d)、up_proj.weight (f, d)、down_proj.weight (d, f)
    融合（transformers 5 的 save_pretrained，也是参数字典的布局）：
        model.layers.{i}.mlp.experts.gate_up_proj (E, 2f, d) = stack_j [gate_j; up_j]（前 f 行是 gate）
        model.layers.{i}.mlp.experts.down_proj (E, d, f) = stack_j down_j

读入时把逐专家的键合并成融合张量（每层多占一份该层专家的内存，随即释放逐专家的张量）；写出总是融合的，
transformers 5 原样读回。缺专家、形状不对：一段话点名文件与键。
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from functional_lm.config import ModelConfig
from functional_lm.shapes import Tensor

__all__ = ["PER_EXPERT", "fuse_experts"]

# 一个逐专家的键：层号、专家号、投影名
PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _layer_experts(tensors: Mapping[str, Tensor], owner: Mapping[str, str], cfg: ModelConfig, layer: int,
                   found: set[str]) -> tuple[Tensor, Tensor]:
    """第 layer 层的逐专家张量 → (gate_up (E, 2f, d), down (E, d, f))；缺键或形状不对时点名拒绝。"""
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    expected = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    prefix = f"model.layers.{layer}.mlp.experts."
    missing = [f"{prefix}{j}.{name}.weight" for j in range(cfg.num_experts) for name in expected
               if f"{prefix}{j}.{name}.weight" not in found]
    if missing:
        files = sorted({owner[key] for key in found if key.startswith(prefix)})
        raise ValueError(f"{', '.join(files)}: layer {layer} stores its experts one by one but lacks {missing[:3]}"
                         f"{' …' if len(missing) > 3 else ''} (config.json says num_experts={cfg.num_experts})")
    for j in range(cfg.num_experts):
        for name, shape in expected.items():
            key = f"{prefix}{j}.{name}.weight"
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{owner[key]}: {key} has shape {tuple(tensors[key].shape)}, but config.json "
                                 f"implies {shape}")
    rows = range(cfg.num_experts)
    gate_up = torch.stack([torch.cat([tensors[f"{prefix}{j}.gate_proj.weight"], tensors[f"{prefix}{j}.up_proj.weight"]])
                           for j in rows])
    down = torch.stack([tensors[f"{prefix}{j}.down_proj.weight"] for j in rows])
    return gate_up, down


def fuse_experts(tensors: dict[str, Tensor], owner: dict[str, str], cfg: ModelConfig) -> None:
    """原地把逐专家的键合并成融合张量（没有逐专家键时什么也不做）；专家号超出 num_experts 的键留给键集核对去点名。"""
    per_layer: dict[int, set[str]] = {}
    for key in tensors:
        match = PER_EXPERT.fullmatch(key)
        if match and int(match.group(2)) < cfg.num_experts:
            per_layer.setdefault(int(match.group(1)), set()).add(key)
    for layer, found in sorted(per_layer.items()):
        if not cfg.is_moe_layer(layer):
            continue  # 稠密层不该有专家：留给键集核对去点名
        gate_up, down = _layer_experts(tensors, owner, cfg, layer, found)
        where = owner[min(found)]
        for key in found:
            del tensors[key], owner[key]
        prefix = f"model.layers.{layer}.mlp.experts."
        tensors[prefix + "gate_up_proj"], owner[prefix + "gate_up_proj"] = gate_up, where
        tensors[prefix + "down_proj"], owner[prefix + "down_proj"] = down, where
