"""一个结构家族对共享解码栈（models.decoder）的描述：参数形状、两种混合器、RoPE 表。

解码栈只有一份：嵌入 → num_layers × layers.transformer_block → 最终 RMSNorm → 输出投影。家族之间不同的只有
每层有哪些参数（layer_shapes）、注意力用哪个函数（GQA / MLA）、第 i 层的前馈用哪个函数（稠密 SwiGLU / MoE），
以及 RoPE 的 cos / sin 表怎样算（plain / YaRN）。这些都是纯函数，记在一个 NamedTuple 里。
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from functional_lm.config import ModelConfig
from functional_lm.shapes import Tensor

__all__ = ["Family"]

LayerShapes = Callable[[ModelConfig, int], dict[str, tuple[int, ...]]]
FFN = Callable[[Tensor, Mapping[str, Tensor], ModelConfig], Tensor]


class Family(NamedTuple):
    """一个家族的全部差异（见模块说明）。"""

    name: str  # config 的 family / model_type
    layer_shapes: LayerShapes  # 第 i 层的参数名（去掉 model.layers.{i}. 前缀）→ 形状，(out, in) 布局
    attention: Callable[..., Any]  # 注意力混合器，签名同 layers.gqa_attention
    ffn: Callable[[ModelConfig, int], FFN]  # 第 i 层的前馈混合器，签名 ffn(x, mlp 参数, cfg)
    rope: Callable[[Tensor, ModelConfig, torch.dtype], tuple[Tensor, Tensor]]  # 位置 (b, t) → cos, sin (b, t, r)
