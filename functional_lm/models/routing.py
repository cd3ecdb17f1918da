"""MoE 模型的路由器 logits：MoE 学生的负载均衡辅助损失（layers.moe.load_balancing_loss）要用它们。

``router_logits(params, ids, cfg) -> (logits, [每个 MoE 层的路由 logits (b·t, E)])``：同一个解码栈，只是把
MoE 层的前馈换成“先记下 x W_gateᵀ、再照常计算”的版本，所以 logits 与 ``forward`` 逐位相同。
冻结的教师不需要它；普通的 ``forward`` 签名不变。
"""

from collections.abc import Mapping
from typing import Optional

from einops import rearrange

from functional_lm.config import ModelConfig
from functional_lm.layers import linear
from functional_lm.models.decoder import (
    EMBED_KEY, decode_embeddings, default_position_ids, embed, family_of, output_weight,
)
from functional_lm.shapes import Float, Integer, Tensor, typechecked

__all__ = ["router_logits"]


def _recording(family, records: list[Tensor]):
    """家族的副本：第 i 个 MoE 层的前馈先把路由 logits 追加到 records，再调用原来的前馈。"""

    def ffn_for(cfg: ModelConfig, index: int):
        inner = family.ffn(cfg, index)
        if not cfg.is_moe_layer(index):
            return inner

        def ffn(x: Tensor, mlp: Mapping[str, Tensor], cfg: ModelConfig) -> Tensor:
            records.append(linear(rearrange(x, "b t d -> (b t) d"), mlp["gate.weight"]))
            return inner(x, mlp, cfg)

        return ffn

    return family._replace(ffn=ffn_for)


@typechecked
def router_logits(
    params: Mapping[str, Tensor],
    input_ids: Integer[Tensor, "b t"],
    cfg: ModelConfig,
    *,
    attention_mask: Optional[Tensor] = None,
) -> tuple[Float[Tensor, "b t v"], list[Tensor]]:
    """完整前向的 logits 与各 MoE 层的路由 logits（与 transformers 的 ``output_router_logits=True`` 相同）。"""
    if not cfg.num_experts:
        raise ValueError(f"router_logits: family {cfg.family!r} has no MoE layers (num_experts=0)")
    records: list[Tensor] = []
    x = embed(input_ids, params[EMBED_KEY])
    hidden = decode_embeddings(
        params, x, cfg, position_ids=default_position_ids(input_ids, attention_mask), attention_mask=attention_mask,
        family=_recording(family_of(cfg), records),
    )
    return linear(hidden, output_weight(params, cfg)), records
