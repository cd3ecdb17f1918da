"""公开路径 ``functional_lm.losses``：蒸馏损失（稠密散度、稀疏 top-k、分块引擎）。

公开函数
--------
``distillation_loss``          普通版：输入完整 logits。
``chunked_distillation_loss``  分块版：输入最终隐藏状态与输出投影（共享嵌入），逐块算 logits、损失与梯度，
                               峰值内存 O(chunk × vocab)；值与梯度等于普通版。
``sparse_distillation_loss``   稀疏教师：教师以 top-k id + 温度 T 下的 log 概率（+ 尾部质量）给出，可缓存。
``teacher_topk``               从教师 logits 生成上述稀疏目标。
``token_divergence``           逐 token 的散度值（不做掩码与平均）。
``temperature_log_softmax``    log softmax(z/T)，填充列为 −∞（概率为 0）。
``chunked_cross_tokenizer_loss`` 跨分词器：映射目标的稀疏散度 + ULD（排序概率的 W₁）+ CE，分块。
``uld_distance``               ULD：排序后概率向量之间（截到教师 top-k）的 Wasserstein-1 距离。

各在 divergences.py（稠密）、sparse.py（稀疏）、chunked.py（分块）；共用的约定与零件在 common.py。
"""

from functional_lm.losses.chunked import (
    chunked_cross_tokenizer_loss,
    chunked_distillation_loss,
    chunked_sparse_distillation_loss,
)
from functional_lm.losses.cross_tokenizer import uld_distance
from functional_lm.losses.common import DIVERGENCES
from functional_lm.losses.divergences import distillation_loss, temperature_log_softmax, token_divergence
from functional_lm.losses.sparse import sparse_distillation_loss, teacher_topk

__all__ = [
    "DIVERGENCES",
    "distillation_loss",
    "chunked_distillation_loss",
    "chunked_sparse_distillation_loss",
    "chunked_cross_tokenizer_loss",
    "uld_distance",
    "sparse_distillation_loss",
    "teacher_topk",
    "token_divergence",
    "temperature_log_softmax",
]
