"""服务端教师：OpenAI 兼容服务器（vLLM 等）的 ``prompt_logprobs`` → 与教师缓存同样的稀疏目标。

请求只含 token id 与采样设置（``prompt`` 是 id 列表的列表，服务器可用 ``--skip-tokenizer-init`` 启动）：

    POST {url}/completions  {"model": M, "prompt": [[x_0, …, x_{t-1}, 0], …], "max_tokens": 1,
                             "temperature": 0, "prompt_logprobs": K}

对齐（差一位就会悄悄地在垃圾上训练）：vLLM 的 ``prompt_logprobs[0]`` 是 null，第 j 项是“预测第 j 个 token”的
分布 P(· | x_0 … x_{j-1})。我们在位置 i 需要的目标是 P(· | x_0 … x_i)，即第 i+1 项。每条序列末尾补一个 id 0，
于是第 t 项给出最后一个位置 i = t−1 的分布（top-K 与补的 id 无关；补的 id 只影响第 t 项里“实际 token”那一条，
它不被使用）。每一项里：rank ≤ K 的 K 条是 top-K；另有“实际 token”x_j 自己的 log 概率与 rank（不在 top-K 里时
多出一条），留作 actual_log_probs（第 i 个位置 = log P(x_{i+1} | x_0 … x_i)，on-policy 的采样估计用它）。

目标与缓存相同：(top-K id 按概率降序, 它们的 log P, 尾部质量 1 − Σ_topK P)。尾部在 float64 里相减得到（服务器
只给 top-K，无法像本地那样对其余列求 logsumexp），截到 [0, 1]。log P 经过缓存的 float16 存法取整
（teacher_cache.stored_log_probs），所以“服务端在线”“服务端建缓存”与本地 top-K 是同一种数。

温度：服务器的 prompt_logprobs 是 T = 1 的（vLLM 不对它施加采样温度）；只知道 top-K 的值时，T ≠ 1 的分布无法
精确恢复（log softmax(z/T) 需要全部 logits），所以 T ≠ 1 直接拒绝，绝不把 top-K 的 log 概率除以 T。

词表：服务器的 softmax 覆盖它的全部行（含检查点里为对齐而补的行）；本地教师只在真实 token 上取 softmax。训练过的
检查点里补的行概率可以忽略；若某个补的行（id ≥ 真实词表）出现在 top-K 里，它无法作为学生的目标，报错点名。

出错时是一段话（URL 与期望什么）：连接被拒、DNS、超时、HTTP 4xx / 5xx、格式不对的响应、词表不同、K 超过服务器的
--max-logprobs。暂时性的错误（连接被拒、超时、HTTP 408 / 429 / 5xx）按指数退避重试有限次。密钥只从环境变量
FUNCTIONAL_LM_TEACHER_API_KEY 读（``Authorization: Bearer``），从不出现在参数、run.json 或日志里。
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "API_KEY_ENV", "ServedTeacherError", "ServerSettings", "ServedTargets", "ServedTeacher", "completion_body",
    "parse_choice", "document_pieces", "open_served_teacher",
]

API_KEY_ENV = "FUNCTIONAL_LM_TEACHER_API_KEY"
RETRYABLE_HTTP = (408, 429, 500, 502, 503, 504)
PAD_ID = 0  # 补在每条序列末尾的 id：让服务器给出最后一个位置的分布


class ServedTeacherError(ValueError):
    """服务端教师的问题（一段话，点名 URL 与期望什么）。"""


@dataclass(frozen=True)
class ServerSettings:
    """服务端教师的设置：地址、模型名、K，以及超时、重试、并发与每个请求的序列数。"""

    url: str  # OpenAI 兼容的根地址，如 http://127.0.0.1:8000/v1
    top_k: int
    model: Optional[str] = None  # 缺省：服务器只服务一个模型时用它
    timeout_s: float = 120.0
    retries: int = 4
    backoff_s: float = 1.0
    concurrency: int = 4  # 同时在途的请求数
    sequences_per_request: int = 8

    @property
    def base(self) -> str:
        return self.url.rstrip("/")


@dataclass
class ServedTargets:
    """一批序列的服务端目标：ids / log_probs (b, t, K)、tail (b, t)、actual_log_probs (b, t)。"""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail: torch.Tensor
    actual_log_probs: torch.Tensor


def open_served_teacher(run: Any, top_k: int, real_vocab_size: int, seq_len: int) -> ServedTeacher:
    """运行选项（--teacher-url 等）→ 探测过的 ServedTeacher；K 必须给出（服务器只给 top-K）。"""
    if top_k < 1:
        raise ServedTeacherError(
            f"--teacher-url {run['teacher_url']} needs --top-k K >= 1: a served teacher returns only its top-K "
            f"log-probabilities (vLLM's limit is its --max-logprobs), not the full distribution")
    settings = ServerSettings(
        url=str(run["teacher_url"]), top_k=int(top_k), model=run.get("teacher_model"),
        timeout_s=float(run.get("teacher_timeout", 120.0)), concurrency=int(run.get("teacher_concurrency", 4)))
    served = ServedTeacher(settings, real_vocab_size, seq_len)
    served.probe()
    return served


def completion_body(model: str, sequences: Sequence[Sequence[int]], top_k: int) -> dict[str, Any]:
    """一个 /completions 请求体：只有 token id 与采样设置。sequences 已带着末尾多出的那个 id（见模块说明）。"""
    return {"model": model, "prompt": [[int(x) for x in seq] for seq in sequences], "max_tokens": 1,
            "temperature": 0.0, "prompt_logprobs": int(top_k)}


def _entry_rows(entry: Any, sent_id: int, top_k: int, where: str) -> tuple[list[int], list[float], float]:
    """prompt_logprobs 的一项 {id: {logprob, rank, …}} → (top-K id, 它们的 log P, 实际 token 的 log P)。"""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is {type(entry).__name__}, expected an object of token id → {{logprob, rank}}")
    ranked, actual = [], None
    for key, item in entry.items():
        if not isinstance(item, dict) or not isinstance(item.get("logprob"), (int, float)):
            raise ValueError(f"{where}[{key!r}] has no numeric logprob")
        token = int(key)
        if token == sent_id:
            actual = float(item["logprob"])
        if isinstance(item.get("rank"), int) and item["rank"] <= top_k:
            ranked.append((float(item["logprob"]), token))
    if actual is None:
        raise ValueError(f"{where} does not carry the sent token {sent_id} (the server's token ids differ from ours)")
    if len(ranked) < top_k:
        raise ValueError(f"{where} has {len(ranked)} entries of rank <= {top_k}, expected {top_k}")
    ranked.sort(key=lambda pair: (-pair[0], pair[1]))
    ranked = ranked[:top_k]
    return [t for _, t in ranked], [lp for lp, _ in ranked], actual


def parse_choice(choice: Any, sent: Sequence[int], top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """一条发出的序列 sent（t 个 token + 末尾多出的一个 id）的 choice →
    (ids (t, K) int64, log P (t, K) float64, 实际 token 的 log P (t,) float64)。

    第 i 个位置取 prompt_logprobs 的第 i+1 项（见模块说明），实际 token 是 sent[i+1]（最后一个位置是多出的那个 id）。
    格式不对时抛 ValueError（一句话，点名哪一项），由调用方补上 URL。"""
    entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
    t = len(sent) - 1
    if not isinstance(entries, list) or len(entries) != t + 1:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"prompt_logprobs has {got} entries, expected {t + 1} (one per token sent)")
    ids, log_probs, actual = np.zeros((t, top_k), np.int64), np.zeros((t, top_k)), np.zeros(t)
    for i in range(t):
        ids[i], log_probs[i], actual[i] = _entry_rows(entries[i + 1], int(sent[i + 1]), top_k,
                                                      f"prompt_logprobs[{i + 1}]")
    return ids, log_probs, actual


def _tail_mass(log_probs: np.ndarray) -> np.ndarray:
    """尾部质量 1 − Σ_topK P（float64 相减，截到 [0, 1]）。"""
    return np.clip(1.0 - np.exp(log_probs).sum(axis=-1), 0.0, 1.0)


class _Transport:
    """HTTP（标准库 urllib）：JSON 请求、超时、暂时性错误的指数退避重试、错误变成一段话。"""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.key = os.environ.get(API_KEY_ENV)

    def _request(self, path: str, body: Optional[dict]) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.Request(self.settings.base + path, data=data, headers=headers,
                                      method="GET" if body is None else "POST")

    def call(self, path: str, body: Optional[dict] = None) -> Any:
        """发一个请求并解析 JSON；暂时性错误重试 settings.retries 次，其余错误立即抛 ServedTeacherError。"""
        url, attempts = self.settings.base + path, self.settings.retries + 1
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(self._request(path, body), timeout=self.settings.timeout_s) as reply:
                    raw = reply.read()
                break
            except urllib.error.HTTPError as err:
                problem, retry = _http_problem(url, err, self.settings), err.code in RETRYABLE_HTTP
            except (urllib.error.URLError, OSError) as err:
                problem, retry = _network_problem(url, err, self.settings)
            if not retry or attempt == attempts - 1:
                tried = f" (tried {attempt + 1} times)" if retry else ""
                raise ServedTeacherError(problem + tried) from None
            time.sleep(self.settings.backoff_s * 2**attempt)
        try:
            return json.loads(raw)
        except ValueError:
            raise ServedTeacherError(f"the teacher server at {url} answered with something that is not JSON "
                                     f"({raw[:120]!r}); expected an OpenAI-compatible JSON response") from None


def _http_problem(url: str, err: urllib.error.HTTPError, settings: ServerSettings) -> str:
    """HTTP 错误 → 一段话；K 超过服务器上限时说出哪个服务器参数能调高。"""
    try:
        detail = err.read().decode(errors="replace")[:400]
    except OSError:
        detail = ""
    text = f"the teacher server at {url} answered HTTP {err.code} {err.reason}: {detail.strip() or '(no body)'}"
    if err.code >= 500:
        text += ("; a server whose vocabulary is smaller than the student's stops on the first token id it does not "
                 "know (vLLM's engine then fails every request): check that it serves a model with the student's "
                 "vocabulary")
    if "logprobs" in detail and ("max" in detail or "greater" in detail):
        text += (f"; --top-k {settings.top_k} is above what the server returns: start vLLM with "
                 f"--max-logprobs {settings.top_k} (or more), or lower --top-k")
    elif err.code in (401, 403):
        text += f"; set the server's key in the environment variable {API_KEY_ENV}"
    elif err.code == 404:
        text += "; expected an OpenAI-compatible server under this URL (it usually ends in /v1)"
    return text


def _network_problem(url: str, err: BaseException, settings: ServerSettings) -> tuple[str, bool]:
    """连接层的错误 → (一段话, 是否重试)。"""
    reason = getattr(err, "reason", err)
    if isinstance(reason, socket.gaierror):
        return f"the teacher server's host in {url} cannot be resolved ({reason}); check --teacher-url", False
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return (f"the teacher server at {url} did not answer within {settings.timeout_s:g} s; a busy server "
                f"needs a larger --teacher-timeout or fewer --teacher-sequences-per-request"), True
    if isinstance(reason, ConnectionRefusedError):
        return f"nothing accepts connections at {url} (connection refused); is the teacher server running?", True
    return f"the connection to the teacher server at {url} failed: {reason}", True


class ServedTeacher:
    """服务端教师：探测服务器，按批取目标（多个请求同时在途，可提前取下一批），统计等待与吞吐。

    训练器把它当作目标来源（与 TeacherCache 同样的 ``batch_targets(batch, device)``）。"""

    temperature = 1.0
    grades_generated = True  # 在线蒸馏的生成批也能交给它打分（preflight.check_generation）

    def __init__(self, settings: ServerSettings, real_vocab_size: int, seq_len: int) -> None:
        self.settings, self.real_vocab_size, self.seq_len = settings, real_vocab_size, seq_len
        self.top_k = settings.top_k
        self.transport = _Transport(settings)
        self.model: Optional[str] = settings.model
        self.max_model_len: Optional[int] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, settings.concurrency))
        self._pending: dict[bytes, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.wait_s = 0.0  # 训练一侧等服务器的总秒数
        self.server_s = 0.0  # 请求在途的总秒数（各请求相加）
        self.tokens = 0  # 服务器打过分的 token 数
        self._window = (time.perf_counter(), 0, 0.0, 0.0)  # window_stats 的起点

    # ------------------------------------------------------------------ 探测
    def probe(self) -> dict[str, Any]:
        """/models：模型名与 max_model_len；再用一条已知序列核对 id 原样往返、K 条都在、没有超出词表的 id。"""
        models = self.transport.call("/models")
        data = models.get("data") if isinstance(models, dict) else None
        if not isinstance(data, list) or not data:
            raise ServedTeacherError(f"{self.settings.base}/models lists no model; expected an OpenAI-compatible "
                                     f"server with the teacher loaded")
        names = [m.get("id") for m in data if isinstance(m, dict)]
        if self.model is None:
            if len(names) != 1:
                raise ServedTeacherError(f"the teacher server at {self.settings.base} serves {names}; choose one "
                                         f"with --teacher-model")
            self.model = names[0]
        elif self.model not in names:
            raise ServedTeacherError(f"--teacher-model {self.model!r} is not served at {self.settings.base} "
                                     f"(it serves {names})")
        entry = data[names.index(self.model)]
        self.max_model_len = entry.get("max_model_len") if isinstance(entry.get("max_model_len"), int) else None
        if self.max_model_len is not None and self.seq_len + 1 > self.max_model_len:
            raise ServedTeacherError(
                f"the teacher server at {self.settings.base} takes at most {self.max_model_len} tokens per sequence "
                f"(its --max-model-len), but blocks of --seq-len {self.seq_len} need {self.seq_len + 1} (one padding "
                f"id is appended); start the server with a larger --max-model-len or lower --seq-len")
        # 只用小的 id：vLLM 0.32 收到超出它词表的 id 时整个引擎会停掉（HTTP 500），探测不能冒这个险。
        # 核对的是：每一项都带着我们发的 id（服务器按 id 而不是重新分词）、K 条都在、返回的 id 都在学生的词表里。
        self._targets([[9707, 11, 1879, 13, 576, 3974, 13876, 38835, PAD_ID]])  # Qwen 词表里 "Hello, world. The quick brown fox"
        return {"model": self.model, "max_model_len": self.max_model_len, "url": self.settings.base}

    def check_run(self, tcfg: Any, real_vocab_size: int) -> None:
        """训练设置与服务端教师对得上：T = 1（见模块说明）、K 相同、真实词表相同。"""
        if tcfg.temperature != 1.0:
            raise ServedTeacherError(
                f"--temperature {tcfg.temperature:g} with a served teacher ({self.settings.base}): the server returns "
                f"log-probabilities at T = 1 (prompt_logprobs ignore sampling temperature), and the distribution at "
                f"T != 1 cannot be recovered exactly from top-{self.top_k} values (it needs every logit); use "
                f"--temperature 1, or a local --teacher DIR for another temperature")
        if tcfg.top_k != self.top_k or real_vocab_size != self.real_vocab_size:
            raise ServedTeacherError(
                f"the served teacher was set up for top-{self.top_k} over {self.real_vocab_size} tokens, the run uses "
                f"--top-k {tcfg.top_k} over {real_vocab_size}")

    def check_generation(self, student: Any, tcfg: Any) -> None:
        """在线蒸馏（preflight.check_generation 调用）：教师不写续写（teacher_generated_fraction = 0）；
        提示 + 续写放得进学生与服务器。"""
        if tcfg.teacher_generated_fraction > 0:
            raise ValueError(
                f"teacher_generated_fraction={tcfg.teacher_generated_fraction} needs the teacher to write continuations "
                f"in this process, but a served teacher ({self.settings.base}) only grades; set "
                f"--teacher-generated-fraction 0 (on-policy grading of the student's continuations works)")
        from functional_lm.kd.preflight import check_rollout_length

        limit = min([student.cfg.max_seq_len] + ([self.max_model_len - 1] if self.max_model_len else []))
        check_rollout_length(tcfg, limit, f"{limit} (the student's max_seq_len {student.cfg.max_seq_len}, the "
                                          f"server's --max-model-len {self.max_model_len} less the one padding id)")

    # ------------------------------------------------------------------ 取目标
    def _one_request(self, sequences: list[list[int]]) -> tuple[np.ndarray, ...]:
        body = completion_body(self.model, sequences, self.top_k)
        start = time.perf_counter()
        reply = self.transport.call("/completions", body)
        with self._lock:
            self.server_s += time.perf_counter() - start
            self.tokens += sum(len(s) for s in sequences)
        return self._parse(reply, sequences)

    def _parse(self, reply: Any, sequences: list[list[int]]) -> tuple[np.ndarray, ...]:
        where = f"the teacher server at {self.settings.base}/completions"
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            got = len(choices) if isinstance(choices, list) else "no"
            raise ServedTeacherError(f"{where} returned {got} choices for {len(sequences)} sequences; expected one "
                                     f"completion per prompt")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        rows = []
        for n, (choice, seq) in enumerate(zip(choices, sequences)):
            try:
                rows.append(parse_choice(choice, seq, self.top_k))
            except ValueError as err:
                raise ServedTeacherError(f"{where} returned a malformed answer for sequence {n}: {err}; expected "
                                         f"vLLM-style prompt_logprobs (is it an OpenAI-compatible server that "
                                         f"supports prompt_logprobs?)") from None
        ids = np.concatenate([r[0] for r in rows])  # 各条序列的位置首尾相接：(Σ t_i, K)
        if (bad := ids[ids >= self.real_vocab_size]).size:
            raise ServedTeacherError(
                f"{where} returned token id {int(bad.max())}, outside the student tokenizer's {self.real_vocab_size} "
                f"real tokens: the served model's vocabulary or tokenizer differs from the student's (or one of its "
                f"padding rows is in the top-{self.top_k}); serve a teacher with the student's vocabulary")
        return ids, np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows])

    def _targets(self, sequences: list[list[int]]) -> tuple[np.ndarray, ...]:
        """若干条序列 → 首尾相接的 (ids (Σt, K), log P (Σt, K), actual (Σt,))；按 sequences_per_request
        拆成请求，并发地发出。"""
        size = max(1, self.settings.sequences_per_request)
        parts = [sequences[i: i + size] for i in range(0, len(sequences), size)]
        results = list(self._pool.map(self._one_request, parts)) if len(parts) > 1 else [self._one_request(parts[0])]
        return tuple(np.concatenate([r[j] for r in results]) for j in range(3))

    def fetch(self, input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
              next_ids: Optional[Sequence[int]] = None, value_dtype: str = "float16") -> ServedTargets:
        """(b, t) 的 token id → ServedTargets（CPU 张量；log P 按缓存的 value_dtype 存法取整，训练时为 float16）。

        给了文档编号时每一段（同一编号的连续 token）单独作为一条序列发出：服务器没有文档掩码，本地教师在
        文档掩码下每个位置也只看到本段的 token（RoPE 只依赖相对位置，段从 0 开始编号不改变数学）。
        每条序列末尾多发一个 id：行的最后一段发 next_ids[行]（这一行最后一个位置的标签，给出它的实际 log P），
        其余段与没有 next_ids 时发 PAD_ID（那一项的实际 log P 记为 NaN）。"""
        from functional_lm.errors import TeacherUnavailable
        from functional_lm.kd.teacher_cache import stored_log_probs

        pieces = document_pieces(input_ids, segment_ids)
        rows, t = input_ids.cpu().tolist(), input_ids.shape[1]
        ends = [int(next_ids[r]) if next_ids is not None and z == t and next_ids[r] >= 0 else None for r, _, z in pieces]
        sent = [rows[r][a:z] + [PAD_ID if end is None else end] for (r, a, z), end in zip(pieces, ends)]
        try:
            ids, log_probs, actual = self._targets(sent)
        except ServedTeacherError as err:  # 探测通过之后的失败：运行中途服务器出了事，不是输入错误
            raise TeacherUnavailable(str(err)) from None
        b, k = input_ids.shape[0], self.top_k
        out_ids, out_lp, out_actual = np.zeros((b, t, k), np.int64), np.zeros((b, t, k)), np.full((b, t), np.nan)
        offset = 0
        for (r, a, z), end in zip(pieces, ends):
            n = z - a
            out_ids[r, a:z], out_lp[r, a:z] = ids[offset: offset + n], log_probs[offset: offset + n]
            out_actual[r, a:z] = actual[offset: offset + n]
            if end is None:
                out_actual[r, z - 1] = np.nan  # 多发的是 PAD_ID：不是真正的下一个 token
            offset += n
        return ServedTargets(
            torch.from_numpy(out_ids), stored_log_probs(torch.from_numpy(out_lp).float(), value_dtype),
            torch.from_numpy(_tail_mass(out_lp)).float(), torch.from_numpy(out_actual).float())

    def prefetch(self, batch: Any, segment_ids: Optional[torch.Tensor] = None) -> None:
        """提前把这一批交给服务器（后台线程），之后 batch_targets 直接取结果；已在途的不重复发。"""
        request = _request_of(batch, segment_ids)
        key = _key(*request)
        with self._lock:
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self.fetch, *request)

    def served_targets(self, batch: Any, segment_ids: Optional[torch.Tensor] = None) -> ServedTargets:
        """一批的目标：提前取过就等它的结果，否则现在取；等待的时间记进 wait_s。"""
        request = _request_of(batch, segment_ids)
        with self._lock:
            future = self._pending.pop(_key(*request), None)
        start = time.perf_counter()
        try:
            return future.result() if future is not None else self.fetch(*request)
        finally:
            self.wait_s += time.perf_counter() - start

    def batch_targets(
        self, batch: Any, device: torch.device, segment_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """与 TeacherCache.batch_targets 相同的三元组，已搬到 device；segment_ids 是这一批前向所用的文档编号
        （训练器按损失设置给出：文档掩码关闭时为 None，整行发出）。"""
        got = self.served_targets(batch, segment_ids)
        return tuple(x.to(device) for x in (got.ids, got.log_probs, got.tail))  # type: ignore[return-value]

    def label_log_probs(self, batch: Any, device: torch.device, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """每个位置上教师给标签的 log P（b, t），float32 不取整；标签跨文档时为 NaN（那里不计损失）。
        on-policy 的采样估计（on_policy_estimator = sampled）用它。"""
        return self.served_targets(batch, segment_ids).actual_log_probs.to(device)

    def window_stats(self, info: Any = None) -> dict[str, float]:
        """自上次调用以来：服务器的 tokens/s、训练一侧等服务器的秒数与占墙钟时间的比例（训练记录与进度条用）。
        info 不用：每个进程报告它自己等服务器的时间。"""
        now = time.perf_counter()
        with self._lock:
            tokens, server_s, wait_s = self.tokens, self.server_s, self.wait_s
        last = self._window
        wall, d_tokens, d_server, d_wait = now - last[0], tokens - last[1], server_s - last[2], wait_s - last[3]
        self._window = (now, tokens, server_s, wait_s)
        return {"server_tokens_per_s": d_tokens / d_server if d_server > 0 else 0.0,
                "server_wait_s": d_wait, "server_wait_fraction": d_wait / wall if wall > 0 else 0.0}

    def tokens_per_s(self) -> float:
        """服务器的吞吐：打过分的 token 数 / 请求在途的秒数（并发的请求按各自的时间相加，是保守的估计）。"""
        return self.tokens / self.server_s if self.server_s > 0 else math.nan

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def document_pieces(input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor]) -> list[tuple[int, int, int]]:
    """每行按文档编号切成连续的段：[(行, 起, 止)]；没有编号时每行一整段。"""
    b, t = input_ids.shape
    if segment_ids is None:
        return [(r, 0, t) for r in range(b)]
    seg = segment_ids.cpu().numpy()
    pieces = []
    for r in range(b):
        cuts = [0, *(np.flatnonzero(seg[r, 1:] != seg[r, :-1]) + 1).tolist(), t]
        pieces += [(r, a, z) for a, z in zip(cuts[:-1], cuts[1:])]
    return pieces


def _request_of(batch: Any, segment_ids: Optional[torch.Tensor]) -> tuple:
    """一批要发给服务器的东西：(token id, 文档编号, 每行最后一个位置的标签)。"""
    labels = getattr(batch, "labels", None)
    next_ids = None if labels is None else labels[:, -1].cpu().tolist()
    return batch.input_ids.cpu(), None if segment_ids is None else segment_ids.cpu(), next_ids


def _key(input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor], next_ids: Optional[list[int]]) -> bytes:
    """一批的键：形状 + token id、文档编号与末尾标签的字节（生成批与数据批的块号相同而内容不同，所以按内容）。"""
    parts = [input_ids] + ([] if segment_ids is None else [segment_ids])
    flat = [p.detach().cpu().contiguous().numpy().tobytes() for p in parts]
    return repr(tuple(input_ids.shape)).encode() + b"|".join(flat) + repr(next_ids).encode()
