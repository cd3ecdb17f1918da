"""在线（on-policy）蒸馏一步的基准：本项目的一步 vs 仿 TRL GKDTrainer、只用 transformers 搭成的一步。

设定：学生 student-123m，教师为 Qwen2.5-0.5B 形状的随机模型（隐藏 896、24 层、14 头、2 个 KV 头、前馈 4864、
词表 151,936、共享嵌入），float32，CPU。两边用同一组随机权重（init_params 的参数字典，transformers 一侧由同样的
张量 load_state_dict 而来）与同一批提示：b 条随机 id（< 真实词表，种子固定、无填充），每条 P 个 token。
一个在线步分三段计时：

    generate      学生按温度 1 采样 N 个新 token（不设 EOS，两边都恰好生成 N 个），并整理出打分用的批
    teacher       教师的主干在 [提示 | 续写] 上前向到最终隐藏状态（最后的 RMSNorm 之后；no_grad）
    student_loss  教师的输出投影（隐藏状态 × 教师的输出矩阵，no_grad）+ 学生前向 + 损失 + 反向
                  + 梯度裁剪（全局范数 1）+ AdamW 一步

教师的输出投影为什么算在 student_loss 段（两边一样）：本项目训练器的缺省路径（top_k = 0）把它放进分块损失，
每块先乘教师的输出矩阵得到这一块的教师 logits、再与学生的这一块比较，完整的教师 logits 从不存在——这一乘法
与学生的损失交织在一起，拆出来单独计时就得换一条计算路径（例如先物化教师 logits，或改走 top-k 稀疏目标，
损失也随之变了，预热步的损失核对就不再成立）。所以反过来让参照一侧把它的 lm_head 挪到同一段：参照的
teacher 段只跑 ``model.model``（主干 + 最终范数），student_loss 段先在 no_grad 下乘 ``lm_head`` 得到完整的教师
logits，再做学生一侧。这样两边的每一段做同样的工作：teacher 段比的是两个主干，student_loss 段比的是
“教师投影 + 学生的前向反向与损失 + 优化器”。参照仍像 GKDTrainer 那样对全部 P + N 个位置做投影，本项目只对
计损失的 N 个位置做——这是实现上真正省下的工作，落在 student_loss 段里，两边都算在这一段。

损失是只在生成的 token 上平均的逐 token 反向 KL（α = 1、T = 1，没有交叉熵项）：

    loss = (1/(b·N)) · Σ_{生成的位置} KL(Q‖P) = Σ_v Q_v · (log Q_v − log P_v)，Q = 学生，P = 教师

    ours       functional_lm 的生产路径（即训练器的 --compile-generation true）：generate(compile=True，缓存长度固定为 P + N，编译的解码步跨步复用；
               每行自己的种子，vocab_limit = 真实词表) → on_policy.scoring_batch → train.teacher_hidden_states
               （只到最终隐藏状态）→ train.distill_loss（分块损失按块乘输出投影，从不物化整批 logits；设置取
               on_policy.source_settings(...)["student"]）→ backward → clip → build_optimizer 的 AdamW
    reference  GKDTrainer 的做法（用 transformers 与 torch 重写其计算模式；真正的 TRL 见 bench_trl.py）：学生
               Qwen2ForCausalLM.generate(do_sample, temperature 1, top_k 0, top_p 1，动态 KV 缓存) → 教师
               主干整段前向（model.model）→ [student_loss 段] 教师 lm_head 得完整 logits (b, P+N, V)
               → 学生整段前向（带梯度）取完整 logits → 截到续写位置 [P−1 : −1]、log_softmax 后按 GKD 的
               β = 1（即反向 KL）逐 token 求和、在续写 token 上平均 → backward → clip → AdamW

本项目一侧保持训练器的缺省设置：运行时形状检查打开（typecheck），学生 float32、不编译前向与损失。
每边先完整预热一步（不计时；本项目的解码步在这里编译）。预热时参照一侧的教师与学生打分用的是本项目预热生成的
同一批序列，两边的初始权重相同，所以两个损失应当一致（JSON 里的 warmup_loss_rel_diff，核对两边算的是同一个量）。
随后两边轮流各跑 --steps 步（缺省 3；机器与别人共享，轮流让两边经历相近的负载），每段取各步的中位数。表中各行：

    generate_s / teacher_s / student_loss_s   s  各段耗时（teacher_s 不含教师的输出投影，见上），
                                                 比值 = ours / reference（< 1 表示本项目更快）
    step_s                                    s  整步墙钟时间（三段之和），比值同上
    step_sys                              %user  100 · 系统态 / 用户态 CPU 秒（计时各步合计），无比值
    step_faults                     faults/step  每个计时步的次缺页数，无比值

两边在同一个进程、同样的 malloc 设置下测量（导入 _bench_common 即应用 tune_malloc）。表前另打印一行加速比
（reference / ours），表后是一行 JSON；main(argv) 返回 JSON 的内容，外加 "rows"（见 _bench_common.py）。

    python benchmarks/bench_on_policy.py                  # 缺省 b 8、P 64、N 64，3 步中位数，student-123m ← 0.5B 形状教师
    python benchmarks/bench_on_policy.py --out benchmarks/results/bench_on_policy-$(date +%F).json
    python benchmarks/bench_on_policy.py --steps 1        # 每边只计时一步
    python benchmarks/bench_on_policy.py --smoke          # 同一条路径、极小尺寸（1 层 smoke 学生与稍大的 1 层教师）
    python benchmarks/bench_on_policy.py --device cuda    # GPU 检查（benchmarks/gpu_check.sh）：两边都在 GPU 上
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _bench_common import (
    SMOKE_MODEL, hf_model_from_params, measured, model_config, parse_with_smoke, print_table, row, usage_rows,
    write_result,
)

# 教师形状：Qwen2.5-0.5B（与 bench_train.TEACHER_SHAPE 相同）；smoke 教师比 smoke 学生宽一些（隐藏 96、前馈 192）。
TEACHERS = {
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
        vocab_size=151936, max_seq_len=32768, rope_theta=1e6, tie_word_embeddings=True,
    ),
    "smoke": {**SMOKE_MODEL, "hidden_size": 96, "intermediate_size": 192},
}
REAL_VOCAB = 151665  # Qwen2.5 的真实词表（嵌入矩阵其后的行是填充）
PHASES = ("generate_s", "teacher_s", "student_loss_s")
SIDES = ("ours", "reference")
# --smoke 的缺省值（显式参数仍然优先）：批 2、提示 8、新 8 个 token，每边计时 1 步。
SMOKE = dict(student="smoke", teacher="smoke", batch=2, prompt=8, new_tokens=8, steps=1, real_vocab=250)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="提示条数 b / number of prompts b")
    p.add_argument("--prompt", type=int, default=64, help="每条提示的 token 数 P / prompt tokens P")
    p.add_argument("--new-tokens", type=int, default=64, help="每条生成的 token 数 N / new tokens per prompt N")
    p.add_argument("--student", default="student-123m",
                   help="学生预设名（smoke 为 _bench_common.SMOKE_MODEL）/ student preset (smoke = SMOKE_MODEL)")
    p.add_argument("--teacher", choices=sorted(TEACHERS), default="qwen2.5-0.5b", help="教师形状 / teacher shape")
    p.add_argument("--steps", type=int, default=3, help="每边计时的步数，各段取中位数（另有一步预热）/ timed steps per "
                   "side, median per phase (plus one warm-up)")
    p.add_argument("--real-vocab", type=int, default=REAL_VOCAB,
                   help="真实词表大小（其后的列不采样、不计损失）/ real vocabulary size (later columns are excluded)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU 线程数（缺省用 torch 的设置）/ torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu 或 cuda（GPU 检查用；两边都在这个设备上）/ cpu or cuda (the GPU "
                   "check; both sides run on it)")
    return parse_with_smoke(p, argv, SMOKE)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- 模型与提示
def _configs(args):
    """(学生配置, 教师配置)。"""
    from functional_lm import ModelConfig

    return model_config(args.student), ModelConfig(**TEACHERS[args.teacher])


def _prompts(args) -> torch.Tensor:
    """b 条随机提示 (b, P)：id < 真实词表，种子固定（在 CPU 上抽，与设备无关），没有填充；放到 --device 上。"""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, args.real_vocab, (args.batch, args.prompt), generator=g).to(args.device)


def _sync(device: str) -> None:
    """CUDA 的核是异步的：计时的每一段结束时等设备做完，段与段的耗时才分得开。"""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Side:
    """一边的一个在线步，拆成三段：generate(种子) → x；teacher(x) → t；student_loss(x, t) → 损失（float）。"""

    generate: Callable[[int], Any]
    teacher: Callable[[Any], Any]
    student_loss: Callable[[Any, Any], float]
    device: str = "cpu"


# ---------------------------------------------------------------- 本项目的一步
def _ours_generate(params, cfg, prompts, args) -> Callable[[int], Any]:
    """学生写续写（编译的解码步、每行一个种子），再整理成打分批：输入 = 序列[:-1]，标签 = 序列[1:]，
    只有生成的 token 计损失。EOS 取嵌入的最后一行（≥ 真实词表，vocab_limit 之下永远采不到）。"""
    from functional_lm.generate import generate
    from functional_lm.kd.on_policy import rollout_seed, scoring_batch

    mask = torch.ones_like(prompts)
    p, n = args.prompt, args.new_tokens

    def run(seed: int):
        seeds = [rollout_seed(seed, "bench", i) for i in range(args.batch)]
        with torch.no_grad():
            out = generate(params, cfg, prompts, n, attention_mask=mask, temperature=1.0, seed=seeds,
                           max_cache_len=p + n, compile=True, vocab_limit=args.real_vocab)
        return scoring_batch(prompts, mask, out[:, p:], eos_ids=[cfg.vocab_size - 1])

    return run


def ours_side(args, student: dict, teacher: dict) -> Side:
    """本项目的一步：与训练器 optimizer_step → _micro_step（来源 "student"）相同的组成。"""
    from functional_lm import TrainingConfig
    from functional_lm.models.decoder import unique_tensors
    from functional_lm.kd.on_policy import source_settings
    from functional_lm.kd.step import build_optimizer
    from functional_lm.kd.objective import Model, distill_loss, document_segments, teacher_hidden_states

    scfg, tcfg_model = _configs(args)
    base = TrainingConfig(on_policy_fraction=1.0, loss_chunk_size=1024, temperature=1.0)
    tcfg = source_settings(base)["student"]  # α = 1、反向 KL、按“填充 / 真实”编号遮挡
    params = {k: v.requires_grad_(True) for k, v in student.items()}
    teacher_model = Model(teacher, tcfg_model)
    optimizer = build_optimizer(params, tcfg)

    def teacher_side(batch):
        return teacher_hidden_states(teacher_model, batch.input_ids, segment_ids=document_segments(batch, tcfg))

    def student_side(batch, t_hidden) -> float:
        loss, _ = distill_loss(params, scfg, batch, teacher_model, t_hidden, tcfg, real_vocab_size=args.real_vocab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unique_tensors(params), tcfg.gradient_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return Side(_ours_generate(params, scfg, _prompts(args), args), teacher_side, student_side, args.device)


# ---------------------------------------------------------------- 参照：GKDTrainer 式的一步
def reverse_kl_on_completion(s_logits, t_logits, prompt_len: int, real_vocab: int) -> torch.Tensor:
    """GKD 的广义 JSD 在 β = 1 的端点（反向 KL），写在完整 logits 上。

    logits 形状 (b, P+N, V)；位置 j 预测 token j+1，续写的 N 个 token 由位置 P−1 … P+N−2 预测，即 [P−1 : −1]。
    log Q = log_softmax(z_s)、log P = log_softmax(z_t)（float32，T = 1，只在真实词表的列上），
    逐 token KL(Q‖P) = Σ_v Q_v · (log Q_v − log P_v)，再在 b·N 个续写 token 上取平均。"""
    log_q = F.log_softmax(s_logits[:, prompt_len - 1 : -1, :real_vocab].float(), dim=-1)
    log_p = F.log_softmax(t_logits[:, prompt_len - 1 : -1, :real_vocab].float(), dim=-1)
    per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)  # Σ_v Q·(log Q − log P)
    return per_token.mean()


def _hf_optimizer(model) -> torch.optim.AdamW:
    """与 build_optimizer 相同的两组 AdamW：矩阵与嵌入衰减 0.01，范数与偏置不衰减。"""
    named = list(model.named_parameters())
    keep = [p for n, p in named if n.endswith(("bias", "norm.weight"))]
    decay = [p for n, p in named if not n.endswith(("bias", "norm.weight"))]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8)


def reference_side(args, student: dict, teacher: dict) -> Side:
    """参照的一步：transformers generate（动态缓存）→ 教师主干 → 教师 lm_head 的完整 logits + 学生完整 logits
    + 反向 KL（后两者同在 student_loss 段）。"""
    scfg, tcfg_model = _configs(args)
    s_model = hf_model_from_params(student, scfg).to(args.device).train()
    t_model = hf_model_from_params(teacher, tcfg_model, share=True).to(args.device).eval().requires_grad_(False)
    optimizer, prompts, p, n = _hf_optimizer(s_model), _prompts(args), args.prompt, args.new_tokens

    def generate_side(seed: int):
        torch.manual_seed(seed)  # transformers 的采样用全局随机数
        with torch.no_grad():
            return s_model.generate(
                prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
            )

    def teacher_side(seq):  # 主干到最终隐藏状态；输出投影在 student_side（见模块说明）
        with torch.no_grad():
            return t_model.model(seq, attention_mask=torch.ones_like(seq)).last_hidden_state

    def student_side(seq, t_hidden) -> float:
        with torch.no_grad():
            t_logits = t_model.lm_head(t_hidden)
        s_logits = s_model(seq, attention_mask=torch.ones_like(seq)).logits
        loss = reverse_kl_on_completion(s_logits, t_logits, p, args.real_vocab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return Side(generate_side, teacher_side, student_side, args.device)


# ---------------------------------------------------------------- 计时
def timed_step(side: Side, seed: int) -> tuple[dict, float, Any]:
    """一步、三段分别计时：返回 ({段名: 秒数, "step_s": 三段之和}, 损失, generate 的输出)。"""
    _sync(side.device)
    start = time.perf_counter()
    x = side.generate(seed)
    _sync(side.device)
    t1 = time.perf_counter()
    t = side.teacher(x)
    _sync(side.device)
    t2 = time.perf_counter()
    loss = side.student_loss(x, t)  # float(loss)：这一步确实算完了
    t3 = time.perf_counter()
    times = {"generate_s": t1 - start, "teacher_s": t2 - t1, "student_loss_s": t3 - t2, "step_s": t3 - start}
    return times, loss, x


def _full_sequence(batch) -> torch.Tensor:
    """打分批 → [提示 | 续写]：输入再接上最后一个标签（不设 EOS 时它就是最后一个生成的 token）。"""
    return torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1)


def warm_up(ours: Side, ref: Side) -> dict:
    """两边各预热一步（不计时；本项目的解码步在这里编译）。参照的教师与学生打分用本项目预热生成的序列：
    两边初始权重相同、序列相同，损失应当一致。返回两个预热损失与各段耗时（编译耗时见 ours 的 generate_s）。"""
    ours_times, ours_loss, batch = timed_step(ours, seed=0)
    _log(f"warm-up ours: {ours_times}")
    seq_out = ref.generate(0)
    seq = _full_sequence(batch)
    ref_loss = ref.student_loss(seq, ref.teacher(seq))
    _log(f"warm-up reference done (generated shape {tuple(seq_out.shape)})")
    rel = abs(ours_loss - ref_loss) / max(abs(ref_loss), 1e-30)
    return {"ours_loss": ours_loss, "reference_loss": ref_loss, "loss_rel_diff": rel,
            "ours_seconds": ours_times, "ours_new_tokens": int(batch.loss_mask.sum(dim=1).min())}


def run_steps(sides: dict, steps: int, new_tokens: int, prompt: int) -> tuple[dict, dict, dict, dict]:
    """两边轮流各跑 steps 步（第 i 步两边都用种子 i + 1）。返回 (各边各段的逐步耗时, 各边的损失,
    各边计时各步的 Usage, 各边每步实际生成的最少 token 数)。"""
    times = {s: {k: [] for k in (*PHASES, "step_s")} for s in sides}
    losses, usage, produced = {s: [] for s in sides}, {}, {s: [] for s in sides}
    for i in range(steps):
        for name, side in sides.items():
            torch.manual_seed(1000 + i)
            with measured(usage, name):
                t, loss, x = timed_step(side, seed=i + 1)
            for key, value in t.items():
                times[name][key].append(value)
            losses[name].append(loss)
            produced[name].append(_generated(x, prompt))
            _log(f"step {i} {name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    return times, losses, usage, produced


def _generated(x, prompt: int) -> int:
    """每行实际生成（计入损失）的 token 数的最小值：本项目看打分批的 loss_mask，参照看输出序列的长度。"""
    if isinstance(x, torch.Tensor):
        return int(x.shape[1] - prompt)
    return int(x.loss_mask.sum(dim=1).min())


# ---------------------------------------------------------------- 汇总
def medians(times: dict) -> dict:
    """各边各段取逐步耗时的中位数。"""
    return {side: {k: float(statistics.median(v)) for k, v in per.items()} for side, per in times.items()}


def build_rows(med: dict, usage: dict) -> list[dict]:
    """三段与整步各一行（秒，比值 = ours / reference），再加整步的两行进程开销。"""
    rows = []
    for key in (*PHASES, "step_s"):
        ours, ref = med["ours"][key], med["reference"][key]
        rows.append(row(key, "s", ours, ref, ours / ref))
    return rows + usage_rows("step", usage["ours"], usage["reference"])


def _summary(args, med, losses, usage, produced, warm) -> dict:
    """写进 JSON 的结果：各段中位数、加速比（reference / ours）、损失、进程开销与核对项。"""
    import transformers

    speedup = {k: round(med["reference"][k] / med["ours"][k], 3) for k in (*PHASES, "step_s")}
    teacher = "smoke-shaped" if args.teacher == "smoke" else "Qwen2.5-0.5B-shaped"
    return {
        "benchmark": "on_policy_step", "device": _device_name(args.device), "threads": torch.get_num_threads(),
        "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "steps": args.steps,
        "student": args.student, "teacher": f"{teacher} (random)", "real_vocab": args.real_vocab,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "teacher_projection_phase": "student_loss_s",  # 两边都把教师的输出投影计在这一段（见模块说明）
        "median_s": {side: {k: round(v, 4) for k, v in per.items()} for side, per in med.items()},
        "speedup": speedup, "losses": losses, "new_tokens_out": produced,
        "sys_pct_user": {s: round(u.sys_pct(), 2) for s, u in usage.items()},
        "faults_per_step": {s: round(u.faults_per_step(), 1) for s, u in usage.items()},
        "warmup_loss_rel_diff": warm["loss_rel_diff"], "warmup_new_tokens": warm["ours_new_tokens"],
        "warmup_compile_s": round(warm["ours_seconds"]["generate_s"], 2),
        "target_step_speedup": 2.0, "target_met": speedup["step_s"] >= 2.0,
    }


def _device_name(device: str) -> str:
    """表头与 JSON 里的设备：CUDA 时写出卡的型号（GPU 数字必须带着卡名报告）。"""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def _build_sides(args) -> dict:
    """两边共用的随机权重：学生种子 0、教师种子 1；各自拿到独立的拷贝（两边的优化器互不影响）。"""
    from functional_lm import init_params

    scfg, tcfg_model = _configs(args)
    student = init_params(scfg, seed=0, device=args.device)
    teacher = init_params(tcfg_model, seed=1, device=args.device)
    _log("building the transformers models (reference)")
    ref = reference_side(args, student, teacher)  # 先拷走：本项目一侧随后在原张量上训练
    return {"ours": ours_side(args, student, teacher), "reference": ref}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sides = _build_sides(args)
    warm = warm_up(sides["ours"], sides["reference"])
    times, losses, usage, produced = run_steps(sides, args.steps, args.new_tokens, args.prompt)
    med = medians(times)
    rows = build_rows(med, usage)
    record = _summary(args, med, losses, usage, produced, warm)
    print("speed-up (reference / ours): " + ", ".join(f"{k} {v:.3g}x" for k, v in record["speedup"].items()))
    print_table(f"one on-policy distillation step on {record['device']}, {args.student} <- {record['teacher']} teacher, "
                f"b {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, fp32, median of {args.steps} "
                "(ratio = ours / reference time: < 1 means ours is faster)", rows,
                reference_label="trl_style")
    print(json.dumps(record))
    write_result(args, __file__, argv, record, rows)
    return {**record, "rows": rows}


if __name__ == "__main__":
    main()
