"""KV 缓存生成：缓存是数据（进出 step 函数的 NamedTuple），prefill / decode_step 是纯函数，只编译解码步。

图例：l 层数，b 批，t 本次写入的位置数，s 缓存槽位数（预分配的最大长度 S），k 键值头，e 头维度，v 词表。

设计（gpt-fast / jax-llm-examples 风格）：
    * 这里没有第二份解码块：prefill 与解码步都走模型自己的缓存路径 ``forward_hidden(..., cache=cache)``
      （models.decoder，块即 layers.transformer_block，缓存见 models.cache.KVCache，在此重新导出）。
    * ``KVCache``：k、v 形状 (l, b, k, S, e)，预分配到最大长度 S，解码步的形状因此是静态的、可编译；
      写入用非原地的 ``index_copy``：输入缓存不变，返回新缓存（像 JAX 一样数据进、数据出）。
    * 注意力在整个 S 上做，用布尔掩码遮住未写入槽位、左填充与未来位置，因此解码步不依赖当前长度。
    * 只编译解码步（``compiled_decode_step``）：编译时只有几行的 ``linear`` 改走 ``layers.streaming_linear``
      （输入行先过 ``fusion_barrier``），prefill 留在 eager（与 transformers 逐位一致）。
    * 采样：温度 → top-k → top-p（核采样：保留累计概率首次达到 p 的最小集合，至少一个），
      用带种子的 ``torch.Generator``，同一种子结果确定；温度为 0 即贪心 argmax。
    * 遇到 eos 的序列此后输出 pad（缺省为第一个 eos），全部结束时提前停止（与 transformers 相同）。
    * ``check_finite=True``：提示的 logits 检查一次（一次同步），之后每步只在设备上累积一个“出现过非有限值”的
      标志，流结束时读一次；解码循环里没有额外的逐 token 同步。出现 NaN / inf 时抛出 ``NonFiniteLogits``。
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import torch

from functional_lm.config import SAMPLING_TEMPERATURE, TOP_P, ModelConfig
from functional_lm.layers import linear
from functional_lm.models.cache import KVCache, init_cache
from functional_lm.models.decoder import EMBED_KEY, check_input_ids, check_params, forward_hidden, output_weight
from functional_lm.shapes import Bool, Float, Int, Integer, Tensor, typechecked
from functional_lm.errors import NonFiniteLogits

__all__ = [
    "KVCache",
    "init_cache",
    "extend",
    "prefill",
    "decode_step",
    "compiled_decode_step",
    "logits_to_probs",
    "sample",
    "left_pad",
    "generate_stream",
    "generate",
    "NonFiniteLogits",
]


@typechecked
def extend(
    params: Mapping[str, Tensor],
    cfg: ModelConfig,
    input_ids: Integer[Tensor, "b t"],
    cache: KVCache,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
) -> tuple[Float[Tensor, "b t d"], KVCache]:
    """把 t 个新 token 写进缓存槽位 index … index+t−1，返回最终 RMSNorm 后的隐藏状态与新缓存。

    就是模型自己的缓存路径 ``forward_hidden(..., cache=cache)``（同一个解码块，见 models.decoder），不做逐键核对：
    prefill（t = 提示长度）在调用前核对一次，解码步（t = 1）在热循环里不核对。
    attention_mask：1 = 真实 token，0 = 左填充；缺省全为真实 token。
    """
    return forward_hidden(params, input_ids, cfg, attention_mask=attention_mask, check=False, cache=cache)


@typechecked
def prefill(
    params: Mapping[str, Tensor],
    cfg: ModelConfig,
    prompt_ids: Integer[Tensor, "b t"],
    cache: KVCache,
    attention_mask: Optional[Integer[Tensor, "b t"] | Bool[Tensor, "b t"]] = None,
) -> tuple[Float[Tensor, "b v"], KVCache]:
    """处理整段提示（可左填充）：写入缓存，只对最后一个位置做输出投影，返回其 logits 与新缓存。"""
    check_params(params, cfg)
    check_input_ids(prompt_ids, cfg)
    free = cache.max_len - int(cache.index)
    if prompt_ids.shape[1] > free:
        raise ValueError(
            f"prompt of length {prompt_ids.shape[1]} does not fit the KV cache "
            f"(max_len={cache.max_len}, {free} free slot(s))"
        )
    if prompt_ids.shape[0] != cache.mask.shape[0]:
        raise ValueError(f"prompt batch {prompt_ids.shape[0]} != cache batch {cache.mask.shape[0]}")
    hidden, cache = extend(params, cfg, prompt_ids, cache, attention_mask)
    return linear(hidden[:, -1], output_weight(params, cfg)), cache


@typechecked
def decode_step(
    params: Mapping[str, Tensor], cfg: ModelConfig, token: Integer[Tensor, "b"], cache: KVCache
) -> tuple[Float[Tensor, "b v"], KVCache]:
    """解码一步：一个新 token/行 → 下一位置的 logits (b, v) 与新缓存；形状静态，可整图编译。"""
    hidden, cache = extend(params, cfg, token[:, None], cache)
    return linear(hidden[:, 0], output_weight(params, cfg)), cache


@functools.lru_cache(maxsize=None)
def compiled_decode_step(mode: Optional[str] = None):
    """``torch.compile(decode_step, fullgraph=True)``（按 mode 缓存，同一进程里只编译一次）。

    CPU 上用缺省 mode；CUDA 上可传 ``"reduce-overhead"``（CUDA graphs）。
    """
    return torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)


# ---------------------------------------------------------------- 采样
def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """温度有限且 >= 0、top-p ∈ (0, 1]（与命令行、TrainingConfig 同一套范围，见 config.Bounds）。"""
    SAMPLING_TEMPERATURE.check("temperature", temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None:
        TOP_P.check("top_p", top_p)


@typechecked
def logits_to_probs(
    logits: Float[Tensor, "*b v"],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Float[Tensor, "*b v"]:
    """logits → 采样分布：先除以温度 T，再 top-k 截断，再 top-p（核）截断，最后重新归一化。

    top-p：按概率降序排列，保留“排在它前面的累计概率 < p”的 token，
    即累计概率首次达到 p 的最小前缀（第一个 token 的前缀和为 0，所以至少保留一个）。
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("logits_to_probs: temperature 0 means greedy decoding; use sample() or argmax")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # 第 k 大的值（并列者都保留）
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # 排在前面的累计概率（不含自己）
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # 放回原来的词表顺序
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _inverse_cdf_rows(probs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """每行用自己的生成器抽一个 u ~ U[0, 1)，取累计概率首次超过 u·Σp 的 token（逆 CDF 抽样）。

    c_i = Σ_{j ≤ i} p_j（float64 累加，float32 的舍入不会让尾部 token 的概率走样），token = min{i : c_i > u·c_V}：
    取到 i 的概率是 (c_i − c_{i−1})/c_V = p_i，p_i = 0 的 token 永远取不到。每行的随机数只来自本行的生成器、
    累加只在本行内进行，所以一行的样本与它和哪些行同批、批怎样切分到各进程无关；每步每行只要一个随机数
    （而不是词表大小个），抽样本身比 torch.multinomial 快数倍。"""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"one generator per row is needed: {len(generators)} generator(s) for {probs.shape[0]} rows")
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=g, device=probs.device, dtype=torch.float64) for g in generators])
    token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return token.clamp_(max=probs.shape[-1] - 1)


@typechecked
def sample(
    logits: Float[Tensor, "b v"],
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator | Sequence[torch.Generator]] = None,
) -> Int[Tensor, "b"]:
    """从 logits 取下一个 token：温度 0 为 argmax，否则按 logits_to_probs 的分布抽样。

    generator 为一组生成器（每行一个）时逐行用逆 CDF 抽样（见 _inverse_cdf_rows），否则用 torch.multinomial。"""
    if temperature == 0:
        _check_sampling(temperature, top_k, top_p)
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        return _inverse_cdf_rows(probs, list(generator))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generators(seed: int | Sequence[int], rows: int, device: torch.device) -> torch.Generator | list[torch.Generator]:
    """一个种子 → 全批共用一个生成器；一组种子（每行一个）→ 每行一个生成器。"""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return torch.Generator(device=device).manual_seed(seed)
    seeds = list(seed)
    if len(seeds) != rows or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seed must be an int or one non-negative int per prompt row ({rows}), got {seed!r}")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- 提示整理
def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None, width: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """把长短不一的 token 列表左填充成 (b, T) 的 ids 与 attention_mask（1 = 真实 token）。

    T 缺省为最长提示的长度；给了 width 时固定为 width（形状不随批变化，编译的解码步可以复用）。"""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt must have at least one token")
    longest = max(len(p) for p in prompts)
    if width is not None and width < longest:
        raise ValueError(f"left_pad: a prompt of {longest} tokens does not fit width={width}")
    width = longest if width is None else width
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.int64)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _prepare_prompt(prompt_ids, attention_mask, device) -> tuple[Tensor, Tensor]:
    """接受 (t,) / (b, t) 张量或 list[int] / list[list[int]]；核对掩码是左填充、每行至少一个真实 token。"""
    if not isinstance(prompt_ids, Tensor):
        rows = list(prompt_ids)
        if rows and not isinstance(rows[0], (list, tuple)):
            rows = [rows]
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted together with a prompt tensor")
        return left_pad(rows, device=device)
    ids = (prompt_ids[None] if prompt_ids.ndim == 1 else prompt_ids).to(device)
    if ids.ndim != 2:
        raise ValueError(f"prompt_ids must have shape (t,) or (b, t), got {tuple(prompt_ids.shape)}")
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device).long()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != prompt shape {tuple(ids.shape)}")
    if bool((mask.sum(dim=-1) == 0).any()):
        raise ValueError("a prompt row has no real token (attention_mask all zero)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left padding (zeros before ones in every row); got right padding")
    return ids, mask


def _eos_tensor(eos_token_id, device) -> Optional[Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.int64, device=device) if ids else None


# ---------------------------------------------------------------- 生成循环
def _cache_length(t: int, max_new_tokens: int, max_cache_len: Optional[int], cfg: ModelConfig) -> int:
    """KV 缓存的长度：缺省 t + max_new_tokens；给定时必须装得下提示与全部新 token，且不超过 max_seq_len。"""
    max_len = t + max_new_tokens if max_cache_len is None else max_cache_len
    if t > max_len:
        raise ValueError(f"prompt of length {t} does not fit the KV cache of max_len={max_len}")
    if t + max_new_tokens > max_len:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} = {t + max_new_tokens} overflows "
            f"the KV cache of max_len={max_len}"
        )
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
    return max_len


def generate_stream(
    params: Mapping[str, Tensor],
    cfg: ModelConfig,
    prompt_ids,
    max_new_tokens: int,
    *,
    attention_mask: Optional[Tensor] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int | Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    seed: int | Sequence[int] = 0,
    max_cache_len: Optional[int] = None,
    compile: bool = False,
    vocab_limit: Optional[int] = None,
    check_finite: bool = False,
) -> Iterator[Int[Tensor, "b"]]:
    """逐步产出新 token（每步一个 (b,) 张量），参数含义见 ``generate``。

    check_finite：提示的 logits 非有限时立即抛出 NonFiniteLogits；解码中出现的非有限值在流的最后一个 token
    之后抛出（提前停止迭代的调用方收不到这一项检查）。"""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    device = params[EMBED_KEY].device
    ids, mask = _prepare_prompt(prompt_ids, attention_mask, device)
    max_len = _cache_length(ids.shape[1], max_new_tokens, max_cache_len, cfg)
    eos = _eos_tensor(eos_token_id, device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    generator = _generators(seed, ids.shape[0], device)
    step = compiled_decode_step() if compile else decode_step
    cache = init_cache(cfg, ids.shape[0], max_len, params[EMBED_KEY].dtype, device)
    logits, cache = prefill(params, cfg, ids, cache, attention_mask=mask)
    if check_finite and not bool(torch.isfinite(logits).all()):  # 提示上的唯一一次同步
        raise NonFiniteLogits(in_prompt=True)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device) if check_finite else None  # 流结束时才读
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]  # 嵌入矩阵的填充行（真实词表之外）永远不会被采到
        if check_finite:
            logits, nonfinite = _note_nonfinite(logits, nonfinite, sampling=temperature > 0)
        token = sample(logits, temperature, top_k, top_p, generator)
        if eos is not None:
            token = torch.where(finished, torch.full_like(token, pad), token)  # 已结束的行输出 pad
            finished = finished | torch.isin(token, eos)
        yield token
        if i == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            if check_finite and bool(nonfinite):
                raise NonFiniteLogits(in_prompt=False)
            return
        logits, cache = step(params, cfg, token, cache)


def _note_nonfinite(logits: Tensor, flag: Tensor, *, sampling: bool) -> tuple[Tensor, Tensor]:
    """flag |= logits 里有 NaN / inf（只在设备上，不同步）。采样时把非有限值换成 0，抽样本身不因此报错——
    这一步的 token 已无意义，流结束时 NonFiniteLogits 会报告它。"""
    flag = flag | ~torch.isfinite(logits).all()
    if sampling:
        logits = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
    return logits, flag


def generate(
    params: Mapping[str, Tensor],
    cfg: ModelConfig,
    prompt_ids,
    max_new_tokens: int,
    *,
    attention_mask: Optional[Tensor] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int | Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    seed: int | Sequence[int] = 0,
    max_cache_len: Optional[int] = None,
    compile: bool = False,
    vocab_limit: Optional[int] = None,
) -> Int[Tensor, "b n"]:
    """自回归生成，返回 ``[提示, 新 token]`` 拼接的 (b, t + n)（与 transformers 的 generate 相同）。

    参数：
        prompt_ids: (b, t) 或 (t,) 张量（配 attention_mask 表示左填充），或 token 列表 / 列表的列表（自动左填充）。
        temperature: 0 为贪心；> 0 时按温度 / top_k / top_p 采样，seed 决定随机数（结果确定）。
        seed: 一个整数（全批一个生成器），或每行一个整数（每行自己的生成器：一行的样本与同批的其他行无关）。
        eos_token_id: 一个或多个 eos；遇到后该行此后输出 pad_token_id（缺省为第一个 eos），全部结束即停止，
            所以 n ≤ max_new_tokens。
        max_cache_len: 预分配的缓存槽位数 S（缺省 t + max_new_tokens）；固定它可让编译的解码步跨调用复用。
        compile: 用 ``torch.compile`` 编译解码步（首次调用有编译开销）。
        vocab_limit: 只在前 vocab_limit 个 id 中取样（真实词表大小；嵌入矩阵末尾的填充行不会被生成）。
    """
    device = params[EMBED_KEY].device
    ids, mask = _prepare_prompt(prompt_ids, attention_mask, device)
    steps = list(
        generate_stream(
            params, cfg, ids, max_new_tokens, attention_mask=mask, temperature=temperature, top_k=top_k,
            top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
            max_cache_len=max_cache_len, compile=compile, vocab_limit=vocab_limit,
        )
    )
    return torch.cat([ids, torch.stack(steps, dim=1)], dim=1)
