"""本项目的 ``functional-lm distill`` 对真正的 TRL ``GKDTrainer``：同一个学生、教师、数据与设置，每个优化步的耗时。

可选的基准，不属于测试套件（测试环境不装 TRL）：``pip install -e ".[trl]"`` 之后运行。本模块的纯函数（数据生成、
设置映射）不需要 TRL，测试会导入并核对它们；TRL 只在 TRL 一侧的子进程里导入。

设定（项目负责人在外部测过的那一个）：
    学生   Qwen2，隐藏 256 × 4 层（4 头、2 个 KV 头、前馈 1024），种子 0 的随机初始化
    教师   Qwen2，隐藏 512 × 4 层（8 头、2 个 KV 头、前馈 2048），种子 1 的随机初始化
    词表   151,936 行（Qwen2.5 的嵌入行数，离线 Qwen 分词器可用；真实 token 151,665 个）、共享嵌入、float32
    数据   200 条对话，由 chat_pairs 从固定词表按种子抽词生成、写成 ``messages`` 的 JSON lines，两边读同一个文件：
           套上 Qwen2.5 聊天模板（含它缺省的系统提示）后，提示（到 ``<|im_start|>assistant\\n`` 为止）恰好 64 个
           token，回复（内容 + ``<|im_end|>``）恰好 64 个 token，之后模板再加一个换行：每条 129 个 token
    批     4 条、不累积；TRL 的 bf16 与梯度（激活）检查点关掉；两步预热之后计时 --steps 步，取中位数

三行设置（ROWS）：
    forward_kl             离线、前向 KL      TRL λ = 0、β = 0        我们 --divergence forward_kl
    jsd                    离线、JSD β = 0.5   TRL λ = 0、β = 0.5      我们 --divergence jsd（β 固定 0.5）
    reverse_kl_on_policy   在线、反向 KL      TRL λ = 1、β = 1        我们 --on-policy-fraction 1 --on-policy-divergence
                           学生写 64 个新 token、采样温度 1              reverse_kl --max-new-tokens 64

约定的对应（CONVENTIONS 逐条写进 JSON）：
    * TRL 的 β：广义 JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M)，M = β·P + (1−β)·Q（P 教师、Q 学生），β = 0 取前向 KL、
      β = 1 取反向 KL——与本项目 losses/divergences.py 的 ``jsd`` 同一个定义、同样的端点约定。
    * TRL 的损失：温度 1 下的 JSD_β（GKDConfig.temperature 只是采样温度），没有 T² 因子、没有交叉熵项；我们的损失是
      α·T²·D + (1−α)·CE，所以我们取 --alpha 1 --temperature 1，两者就是同一个量。
    * TRL 的归约：名为 batchmean，实际是 Σ_{计损失的 token} D / N，N 为 Trainer 数出的 ``labels[..., 1:] ≠ −100`` 的个数
      （num_items_in_batch），即逐 token 平均；我们按计损失的 token 平均。两者相同。
    * 计损失的 token：TRL 的 ChatML 整理器把提示之后的全部 token 当标签，包括 ``<|im_end|>`` 之后模板加的换行；
      我们的对话掩码只算回复内容与 ``<|im_end|>``。TRL 一侧用 mask_newline_after_turn 把那个换行的标签设为 −100
      （输入不变，每步的 token 数不变），两边就在同样的 64 个 token 上求平均。
    * 词表：我们的 softmax 只在真实词表（151,665 列）上取，嵌入之后的 271 行填充不分概率；TRL 在全部 151,936 列上取。
      随机初始化下那 271 列分走约 0.18% 的概率，所以 151,936 行时两边的首步损失不会完全相等；--vocab 151665
      （或 --smoke）时没有填充行，两边的定义重合，首步损失应只差浮点舍入。
    * 在线一行：两边各自采样（TRL 用 transformers 的 generate 与全局随机数，我们用每行播种的采样），样本不同，
      首步损失不可比，只报告；TRL 的 N 来自数据批的标签（生成前数的），数据里回复也是 64 个 token，所以仍是逐 token 平均。
    * 学习率等：两边都取本项目 CLI 的缺省（AdamW 3e-4、β₂ 0.95、权重衰减 0.01、预热 500 步后余弦、梯度裁剪 1）；
      TRL 的优化器实现取它安装后的缺省（记在 JSON 的 trl_optim）。顺序：TRL 按我们第一轮的块顺序读数据
      （train_sampling_strategy = "sequential"），两边第一步是同一批 4 条对话。

每步的 token 数（两边实测，写进 JSON）：离线两行输入都是 4 × 129 个 token、计损失 4 × 64 个；在线一行 TRL 的输入
是 4 × 128（提示 64 + 生成 64），我们是 4 × 127（打分批的输入去掉最后一个 token），计损失都是 4 × 64。

测量：每一侧、每一行一个子进程（峰值内存是它自己的），两边都先应用本项目的 malloc 调优（导入 _bench_common 即
tune_malloc）；另有 TRL “as installed” 一侧（子进程设 FUNCTIONAL_LM_MALLOC=default，不调 malloc），--no-as-installed
可省去。一步的时间 = 相邻两次“优化步结束”之间的墙钟时间（以及进程的用户态 + 系统态 CPU 秒）：TRL 用
TrainerCallback 的 on_step_end（另记 on_step_begin → on_step_end 一段），我们用训练器的 on_step_end 回调。两边的这一段
都含取批（TRL 还含整理器的分词）、生成（在线一行）、前向反向、裁剪与优化器，都不含验证与保存（计时的步里两边都
没有验证与保存）。我们一侧跑的是真正的 ``functional_lm.cli.main(["distill", ...])``：只把 functional_lm.kd.trainer.train
包一层加上 on_step_end 回调、把 optimizer_step 包一层数 token，其余一切（参数解析、设置、数据、教师加载、训练、
最后的验证与保存）都是命令行的原样。峰值内存取最后一个计时步结束时的 max RSS（训练期间的峰值）。

表中每行（比值 = 我们 / TRL，时间与内存 < 1 表示我们更省）：

    <行>              s/step      每个优化步的墙钟秒数（中位数）
    <行>_cpu          cpu_s/step  每个优化步的 CPU 秒数（用户态 + 系统态，中位数）
    <行>_peak_rss     MiB         训练期间的峰值常驻内存
    <行>_first_loss   loss        第一步的损失（同一组初始权重、同一批）
    <行>_as_installed s/step      我们对不调 malloc 的 TRL

    python benchmarks/bench_trl.py                                    # 负责人的设定，估计约 20 分钟（2 核）
    python benchmarks/bench_trl.py --out benchmarks/results/bench_trl-$(date +%F).json
    python benchmarks/bench_trl.py --smoke                            # 极小模型、3 步、词表 151,665：核对两边都能跑、损失一致
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _bench_common import MALLOC_TUNED, parse_with_smoke, print_table, row, run_workers, write_result

# ---------------------------------------------------------------- 设定
@dataclass(frozen=True)
class Setting:
    """一行设定：TRL 的 λ、β 与我们的散度；on_policy 为真时每步都由学生写续写。"""

    lmbda: float
    beta: float
    divergence: str
    on_policy: bool


ROWS = {
    "forward_kl": Setting(lmbda=0.0, beta=0.0, divergence="forward_kl", on_policy=False),
    "jsd": Setting(lmbda=0.0, beta=0.5, divergence="jsd", on_policy=False),
    "reverse_kl_on_policy": Setting(lmbda=1.0, beta=1.0, divergence="reverse_kl", on_policy=True),
}
SIDES = ("ours", "trl", "trl_as_installed")
# 学生与教师的形状：在 student-123m 预设之上改这些字段（词表另由 --vocab 给出）。
MODELS = {
    "owner": (dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024),
              dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=2048)),
    "smoke": (dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128),
              dict(hidden_size=96, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=192)),
}
REAL_VOCAB = 151665  # 离线 Qwen2.5 分词器的 id 数（151,643 个普通 token + 22 个特殊 token）
# 本项目 CLI 的缺省训练设置（TrainingConfig），TRL 一侧照此设置（见 gkd_config_kwargs）。
OPTIMIZER = dict(learning_rate=3e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                 max_grad_norm=1.0, warmup_steps=500, lr_scheduler_type="cosine")
CONVENTIONS = {
    "beta": "TRL's generalized JSD_beta = beta*KL(P||M) + (1-beta)*KL(Q||M), M = beta*P + (1-beta)*Q (P teacher, Q "
            "student); beta=0 is forward KL, beta=1 reverse KL: the same definition and endpoints as our 'jsd'",
    "loss": "TRL: JSD_beta at temperature 1 (GKDConfig.temperature is the sampling temperature only), no T^2 factor, "
            "no cross-entropy term; ours alpha*T^2*D + (1-alpha)*CE, run with --alpha 1 --temperature 1",
    "reduction": "TRL 'batchmean': sum over loss tokens / num_items_in_batch (labels[..., 1:] != -100 counted by the "
                 "Trainer), i.e. a per-token mean; ours: mean over loss tokens",
    "loss_tokens": "TRL's ChatML collator labels every token after the prompt, including the newline the template "
                   "adds after <|im_end|>; ours counts the reply and <|im_end|> only; the TRL side masks that newline "
                   "(mask_newline_after_turn), so both average over the same 64 tokens per conversation",
    "vocabulary": "ours: softmax over the real vocabulary (151,665 columns); TRL: over all embedding rows (151,936 "
                  "with --vocab 151936), so the first-step losses differ by the padding rows' share; equal with "
                  "--vocab 151665",
    "on_policy": "each side samples its own continuations (different generators), so the first-step losses of the "
                 "on-policy row are not comparable",
}
# 离线 Qwen 分词器里“一个词 = 一个 token”（无论前面有没有空格）的常用词：chat_pairs 按 token 精确控制长度。
WORDS = (
    "apple river stone cloud green house table music light paper window yellow silver winter summer water forest "
    "bread chair happy quiet simple bright little friend orange purple animal number letter story travel market "
    "street school money coffee planet rocket camera button circle square signal bridge engine doctor artist "
    "teacher basket rabbit horse flower cookie salt"
).split()
SMOKE = dict(models="smoke", vocab=REAL_VOCAB, pairs=16, prompt_tokens=40, completion_tokens=16, warmup=1, steps=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", choices=sorted(MODELS), default="owner", help="学生与教师的形状 / model shapes")
    p.add_argument("--vocab", type=int, default=151936, help="嵌入行数 / embedding rows (>= 151665)")
    p.add_argument("--pairs", type=int, default=200, help="对话条数 / number of chat pairs")
    p.add_argument("--prompt-tokens", type=int, default=64, help="套模板后的提示 token 数 / templated prompt tokens")
    p.add_argument("--completion-tokens", type=int, default=64,
                   help="回复 token 数（内容 + <|im_end|>），也是在线一行的新 token 数 / reply tokens, also the new tokens")
    p.add_argument("--batch", type=int, default=4, help="每步的对话条数 / conversations per step")
    p.add_argument("--warmup", type=int, default=2, help="不计时的预热步数（≥ 1）/ untimed warm-up steps (>= 1)")
    p.add_argument("--steps", type=int, default=5, help="计时的步数，取中位数 / timed steps (median)")
    p.add_argument("--rows", default=",".join(ROWS), help="要跑的行，逗号分隔 / rows to run: " + ", ".join(ROWS))
    p.add_argument("--as-installed", action=argparse.BooleanOptionalAction, default=True,
                   help="另跑不调 malloc 的 TRL / also run TRL without the malloc tuning")
    p.add_argument("--seed", type=int, default=0, help="数据的种子 / seed of the generated data")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parse_with_smoke(p, argv, SMOKE)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown or args.warmup < 1 or args.steps < 1:
        p.error(f"--rows must name rows among {list(ROWS)} (got {unknown}), --warmup and --steps must be >= 1")
    return args


# ---------------------------------------------------------------- 纯函数：数据与设置映射（不需要 TRL）
def chat_pairs(tokenizer, n: int, prompt_tokens: int, completion_tokens: int, seed: int = 0) -> list[dict]:
    """n 条 ``{"messages": [user, assistant]}``：从 WORDS 按种子抽词，套上聊天模板后提示恰好 prompt_tokens 个 token、
    回复（内容 + <|im_end|>）恰好 completion_tokens 个。每个词是一个 token，所以词数 = 目标长度 − 模板的开销。"""
    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True).input_ids)
    n_user, n_reply = prompt_tokens - overhead, completion_tokens - 1
    if n_user < 1 or n_reply < 1:
        raise ValueError(f"prompt_tokens must exceed the chat template's {overhead} tokens and completion_tokens must "
                         f"be >= 2, got {prompt_tokens} and {completion_tokens}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        messages = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(n_user))},
                    {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(n_reply))}]
        _check_lengths(tokenizer, messages, prompt_tokens, completion_tokens)
        pairs.append({"messages": messages})
    return pairs


def _check_lengths(tokenizer, messages, prompt_tokens: int, completion_tokens: int) -> None:
    """核对一条对话的提示与回复长度（词表里有不是单个 token 的词时这里报错）。"""
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True).input_ids
    full = tokenizer.apply_chat_template(messages)
    if len(prompt) != prompt_tokens or sum(full.assistant_mask) != completion_tokens:
        raise ValueError(f"generated chat has {len(prompt)} prompt and {sum(full.assistant_mask)} reply tokens, "
                         f"wanted {prompt_tokens} and {completion_tokens}: a word in WORDS is not a single token")


def write_jsonl(pairs: list[dict], path: Path) -> Path:
    """每行一个 ``{"messages": [...]}``。"""
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def model_configs(models: str, vocab: int):
    """(学生配置, 教师配置)：student-123m 预设改 MODELS 里的字段与词表。"""
    from functional_lm import get_preset

    student, teacher = MODELS[models]
    base = get_preset("student-123m")
    return base.replace(**student, vocab_size=vocab), base.replace(**teacher, vocab_size=vocab)


def ours_argv(setting: Setting, work: dict, args) -> list[str]:
    """我们一侧的命令行：``functional-lm distill`` 的缺省设置，只改设定规定的（形状、数据、批、步数、目标）。"""
    student, _ = MODELS[args.models]
    fields = {**student, "vocab_size": args.vocab, "batch_size": args.batch, "max_steps": args.warmup + args.steps,
              "alpha": 1, "temperature": 1, "device": "cpu"}
    if setting.on_policy:
        fields |= {"on_policy_fraction": 1, "on_policy_divergence": setting.divergence,
                   "prompt_length": args.prompt_tokens, "max_new_tokens": args.completion_tokens,
                   "generation_temperature": 1}
    else:
        fields["divergence"] = setting.divergence
    argv = ["distill", "--teacher", work["teacher"], "--data", work["data"], "--output-dir", work["run"],
            "--seq-len", str(work["seq_len"]), "--cache-dir", work["cache"], "--no-progress"]
    return argv + [x for k, v in fields.items() for x in ("--" + k.replace("_", "-"), str(v))]


def gkd_config_kwargs(setting: Setting, args, output_dir: str) -> dict:
    """TRL 一侧的 GKDConfig：λ、β、采样温度 1、新 token 数；我们 CLI 的优化设置；关掉 bf16、梯度检查点、日志、
    保存与验证；按给定顺序读数据（sequential），CPU。"""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, lmbda=setting.lmbda, beta=setting.beta, temperature=1.0,
        max_new_tokens=args.completion_tokens, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        seed=0, train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, **OPTIMIZER,
    )


def mask_newline_after_turn(input_ids: torch.Tensor, labels: torch.Tensor, im_end_id: int, newline_id: int) -> torch.Tensor:
    """标签里 ``<|im_end|>`` 之后紧跟的换行设为 −100（我们的对话掩码不计它，见 CONVENTIONS["loss_tokens"]）。"""
    after_end = torch.zeros_like(input_ids, dtype=torch.bool)
    after_end[:, 1:] = (input_ids[:, :-1] == im_end_id) & (input_ids[:, 1:] == newline_id)
    return labels.masked_fill(after_end, -100)


# ---------------------------------------------------------------- 计时（两边共用）
class StepClock:
    """记下每个优化步结束（以及开始，若有）时的墙钟时间、进程 CPU 秒与峰值 RSS。"""

    def __init__(self) -> None:
        self.ends, self.begins = [], []

    @staticmethod
    def _now() -> tuple[float, float, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024

    def begin(self) -> None:
        self.begins.append(self._now())

    def end(self) -> None:
        self.ends.append(self._now())

    def summary(self, warmup: int) -> dict:
        """第 warmup 步之后的各步：相邻两次结束之间的墙钟与 CPU 秒（中位数与全部），峰值 RSS 取最后一步结束时的。"""
        timed = range(warmup, len(self.ends))
        wall = [self.ends[k][0] - self.ends[k - 1][0] for k in timed]
        cpu = [self.ends[k][1] - self.ends[k - 1][1] for k in timed]
        out = {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "all_step_s": wall,
               "all_cpu_s": cpu, "peak_rss_mib": self.ends[-1][2], "steps": len(self.ends)}
        if len(self.begins) == len(self.ends):
            out["begin_to_end_s"] = statistics.median(self.ends[k][0] - self.begins[k][0] for k in timed)
        return out


# ---------------------------------------------------------------- 准备（父进程）
def prepare_workdir(args, root: Path) -> dict:
    """分词器、数据、学生与教师的检查点，以及我们第一轮的数据顺序（TRL 按它读），都放在 root 下。"""
    from functional_lm import init_params
    from functional_lm.data import load_tokenizer, save_default_tokenizer
    from functional_lm.hf import save_pretrained

    tok_dir = save_default_tokenizer(root / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    data = write_jsonl(chat_pairs(tokenizer, args.pairs, args.prompt_tokens, args.completion_tokens, args.seed),
                       root / "chat.jsonl")
    scfg, tcfg = model_configs(args.models, args.vocab)
    save_pretrained(init_params(scfg, seed=0), scfg, root / "student", tokenizer=tok_dir)  # 与 CLI 的学生同一组权重
    save_pretrained(init_params(tcfg, seed=1), tcfg, root / "teacher", tokenizer=tok_dir)
    _write_eos(root / "student", tokenizer)
    work = {"tokenizer": str(tok_dir), "data": str(data), "student": str(root / "student"),
            "teacher": str(root / "teacher"), "cache": str(root / "tokens"),
            "seq_len": args.prompt_tokens + args.completion_tokens + 1}
    work["order"] = training_order(args, work, tokenizer, scfg)
    return work


def _write_eos(student_dir: Path, tokenizer) -> None:
    """学生的 generation_config.json：EOS 与我们的续写相同（分词器的 eos 与 <|im_end|>），TRL 的 GKDTrainer 读它。"""
    from functional_lm.kd.on_policy import end_of_text_ids

    eos = list(end_of_text_ids(tokenizer, tokenizer.eos_token_id))
    (student_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": tokenizer.eos_token_id}), encoding="utf-8")


def training_order(args, work: dict, tokenizer, scfg) -> list[int]:
    """我们的训练器第一轮读对话的顺序（JSON lines 的行号）：与 CLI 相同的 prepare_data，块顺序取
    ``train_loader.epoch_order(0)``。每块恰好是一条对话（块长 = 对话长 + 分隔符），这里逐块核对。"""
    from functional_lm import TrainingConfig
    from functional_lm.data import prepare_data

    tcfg = TrainingConfig()
    data = prepare_data([work["data"]], tokenizer=tokenizer, seq_len=work["seq_len"], batch_size=args.batch,
                        val_fraction=tcfg.val_fraction, seed=tcfg.seed, cache_dir=work["cache"], model_config=scfg,
                        progress=False)
    lines = Path(work["data"]).read_text(encoding="utf-8").splitlines()
    order = [int(data.train.doc_ids[b]) for b in data.train_loader.epoch_order(0)]
    for block, doc in zip(data.train_loader.epoch_order(0), order):
        ids = tokenizer.apply_chat_template(json.loads(lines[doc])["messages"]).input_ids
        if list(data.train.block(int(block)).tokens[:-1]) != ids:
            raise RuntimeError(f"block {block} is not conversation {doc}: the blocks do not align with the chats")
    return order


# ---------------------------------------------------------------- 子进程：我们一侧
def ours_worker(args, work: dict, setting: Setting) -> dict:
    """``functional_lm.cli.main(["distill", ...])``：train 包一层加上 on_step_end，optimizer_step 包一层数 token。"""
    import functional_lm.kd.trainer as train_module
    from functional_lm import cli

    clock, losses, tokens = StepClock(), [], []
    original_train, original_step = train_module.train, train_module.optimizer_step

    def on_step_end(step, metrics):
        clock.end()
        losses.append(metrics["loss"])

    def timed_train(*a, **kw):
        return original_train(*a, **{**kw, "on_step_end": on_step_end})

    def counted_step(stepper, micro, lr, source="data"):
        tokens.append([sum(b.input_ids.numel() for b in micro), sum(train_module.count_valid_tokens(b) for b in micro)])
        return original_step(stepper, micro, lr, source)

    train_module.train, train_module.optimizer_step = timed_train, counted_step
    work = {**work, "run": str(Path(work["cache"]).parent / f"run_{args.row}")}
    code = cli.main(ours_argv(setting, work, args))
    if code != 0:
        raise SystemExit(f"functional-lm distill exited with {code}")
    return {**clock.summary(args.warmup), "losses": losses, "tokens_per_step": tokens}


# ---------------------------------------------------------------- 子进程：TRL 一侧
def trl_worker(args, work: dict, setting: Setting) -> dict:
    """真正的 GKDTrainer：同一个学生、教师、分词器与数据（按我们的顺序），回调计时，compute_loss 记下损失与 token 数。"""
    import datasets
    import transformers

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        from trl.experimental.utils import DataCollatorForChatML
    except ImportError:  # 更早的 TRL 把它们放在顶层
        from trl import DataCollatorForChatML, GKDConfig, GKDTrainer

    tok = transformers.AutoTokenizer.from_pretrained(work["teacher"])
    student = transformers.AutoModelForCausalLM.from_pretrained(work["student"], dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(work["teacher"], dtype=torch.float32)
    lines = Path(work["data"]).read_text(encoding="utf-8").splitlines()
    dataset = datasets.Dataset.from_list([json.loads(lines[i]) for i in work["order"]])
    clock, record = StepClock(), {"losses": [], "tokens_per_step": []}
    config = GKDConfig(**gkd_config_kwargs(setting, args, str(Path(work["cache"]).parent / f"trl_{args.row}")))
    trainer = _recording_trainer(GKDTrainer, record)(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tok,
        data_collator=_matching_collator(DataCollatorForChatML(tokenizer=tok, max_length=config.max_length), tok),
        callbacks=[_clock_callback(clock)],
    )
    trainer.train()
    optim = str(getattr(config.optim, "value", config.optim))  # 枚举（OptimizerNames）取它的值
    return {**clock.summary(args.warmup), **record, "trl_optim": optim, "versions": _trl_versions()}


def _matching_collator(inner, tok):
    """TRL 的整理器之后把 <|im_end|> 后的换行移出标签（mask_newline_after_turn）。"""
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False).input_ids[0]

    def collate(examples):
        batch = inner(examples)
        batch["labels"] = mask_newline_after_turn(batch["input_ids"], batch["labels"], im_end, newline)
        return batch

    return collate


def _recording_trainer(base, record: dict):
    """GKDTrainer 的子类：compute_loss 原样计算，只记下损失、输入 token 数与计损失的 token 数。"""

    class Recording(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            record["losses"].append(float(loss.detach()))
            record["tokens_per_step"].append([int(inputs["input_ids"].numel()), int((inputs["labels"][:, 1:] != -100).sum())])
            return out

    return Recording


def _clock_callback(clock: StepClock):
    """TrainerCallback：on_step_begin / on_step_end 记时。"""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    return Clock()


def _trl_versions() -> dict:
    import accelerate
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def worker(args) -> None:
    """子进程入口：跑一侧、一行，结果以一行 JSON 写到 stdout。"""
    work = json.loads(Path(args.workdir, "work.json").read_text(encoding="utf-8"))
    setting = ROWS[args.row]
    result = ours_worker(args, work, setting) if args.worker == "ours" else trl_worker(args, work, setting)
    print(json.dumps({**result, "malloc_tuned": MALLOC_TUNED}))


# ---------------------------------------------------------------- 汇总（父进程）
def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def build_rows(results: dict) -> list[dict]:
    """每个设定四行（加上 as installed 一行）：步时、CPU 秒、峰值 RSS、首步损失；比值 = 我们 / TRL。"""
    rows = []
    for name, res in results.items():
        ours, trl = res["ours"], res["trl"]
        for suffix, unit, key in (("", "s/step", "step_s"), ("_cpu", "cpu_s/step", "cpu_s"),
                                  ("_peak_rss", "MiB", "peak_rss_mib")):
            rows.append(row(name + suffix, unit, ours[key], trl[key], ours[key] / trl[key]))
        rows.append(row(name + "_first_loss", "loss", ours["losses"][0], trl["losses"][0],
                        ours["losses"][0] / trl["losses"][0]))
        if "trl_as_installed" in res:
            plain = res["trl_as_installed"]
            rows.append(row(name + "_as_installed", "s/step", ours["step_s"], plain["step_s"],
                            ours["step_s"] / plain["step_s"]))
    return rows


def _summary(args, results: dict) -> dict:
    """JSON：设定、约定、各侧结果、首步损失的相对差与能否相等。"""
    comparable = args.vocab == REAL_VOCAB
    return {
        "benchmark": "trl_gkd_vs_distill", "models": {"shapes": MODELS[args.models], "vocab": args.vocab},
        "pairs": args.pairs, "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
        "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "dtype": "float32",
        "rows": {name: vars(ROWS[name]) for name in results}, "conventions": CONVENTIONS,
        "first_loss_rel_diff": {name: rel_diff(r["ours"]["losses"][0], r["trl"]["losses"][0]) for name, r in results.items()},
        "first_loss_comparable": {name: comparable and not ROWS[name].on_policy for name in results},
        "results": results,
    }


def _require_trl() -> None:
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("bench_trl needs TRL, which is not installed: pip install -e \".[trl]\" (it is optional and "
                         "not part of the test run)")


def _failures(results: dict) -> list[str]:
    return [f"{row_name}/{side}: {res['error']}\n{res.get('stderr_tail', '')}"
            for row_name, sides in results.items() for side, res in sides.items() if "error" in res]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    _require_trl()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        work = prepare_workdir(args, Path(tmp))
        Path(tmp, "work.json").write_text(json.dumps(work), encoding="utf-8")
        for name in args.rows.split(","):
            extra = ("--row", name, "--workdir", tmp)
            results[name] = run_workers(__file__, argv, ("ours", "trl"), extra)
            if args.as_installed:
                results[name] |= run_workers(__file__, argv, ("trl_as_installed",), extra,
                                             env={"FUNCTIONAL_LM_MALLOC": "default"})
    failed = _failures(results)
    if failed:
        raise SystemExit("bench_trl: a side failed:\n" + "\n".join(failed))
    rows, record = build_rows(results), _summary(args, results)
    print_table(f"functional-lm distill vs TRL GKDTrainer, {args.models} models, vocab {args.vocab}, batch {args.batch}, "
                f"median of {args.steps} steps after {args.warmup} (ratio = ours / TRL)", rows, reference_label="trl")
    print(json.dumps(record))
    write_result(args, __file__, argv, record, rows)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
