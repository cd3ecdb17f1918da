"""蒸馏训练步基准：本项目的训练步 vs 由 transformers 模型 + 普通（完整 logits）KD 损失搭成的基线。

设定（issue 6）：学生 student-123m，教师为 Qwen2.5-0.5B 形状的随机模型（隐藏 896、24 层、14 头、2 个 KV 头、
前馈 4864、词表 151,936、共享嵌入），float32，CPU。一个训练步 = 教师前向（no_grad）+ 学生前向 +
损失 α·T²·KL(教师‖学生, T) + (1−α)·CE + 反向 + 梯度裁剪 + AdamW。

    ours      functional_lm.kd.trainer：forward_hidden + 分块蒸馏损失（从不物化整批 logits），教师 float32
    ours_compile       同上，打开 TrainingConfig.compile：torch.compile 编译师生前向与分块损失的逐元素部分
    ours_teacher_bf16  ours_compile 再加上教师以 bfloat16 权重运行（TrainingConfig.teacher_bf16）
    baseline  transformers 的 Qwen2ForCausalLM（学生训练、教师 no_grad）+ 教科书式的完整 logits 损失：
              F.kl_div(log_softmax(s/T), log_softmax(t/T)) · T² 与 F.cross_entropy，教师 float32
    baseline_teacher_bf16  同一个基线，教师换成同一组 bfloat16 权重（logits 转回 float32 再算损失）

比值各自只改变一件事：ours、ours_compile 对 baseline（教师都是 float32），ours_teacher_bf16 对
baseline_teacher_bf16（两边教师都是同一组 bf16 权重），见 REFERENCE。

两边从同一组权重出发：学生 init_params(种子 0)、教师 init_params(种子 1，bf16 变体直接以 bf16 生成)，基线的
transformers 模型由这些张量 load_state_dict 而来（_bench_common.hf_model_from_params）；同一批 token。所以每对
（变体, 它的参照）第一步的损失应当一致——JSON 的 first_loss_rel_diff 逐对记下相对差（float32 只差舍入，
bf16 教师差在两边 bf16 logits 的舍入上）。

每个变体在独立子进程中运行；峰值内存取子进程自身的 max RSS，时间取若干步中最快的一步（首步预热不计）。
子进程还用 getrusage 测量计时各步（同样不含首步）的用户态 / 系统态 CPU 秒与次缺页数，写进它的 JSON（"usage"）。
最后打印一张比值表与一行 JSON：各自的 tokens/s、峰值内存与比值（ours / baseline）；表中每个本项目变体四行：

    <变体>             tok/s        本项目与 baseline 的吞吐，比值
    <变体>_sys         %user        100 · 系统态 / 用户态 CPU 秒，参照为 baseline 子进程的值，无比值
    <变体>_faults      faults/step  每个计时步的次缺页数，参照同上，无比值
    <变体>_peak_rss    MiB          峰值内存，比值

（参照一列是这个变体的参照：baseline 或 baseline_teacher_bf16。）

每个子进程都导入 _bench_common（即应用 tune_malloc），两边在同样的 malloc 设置下运行（表前打印一行说明）。
main(argv) 返回 JSON 的内容，外加 "rows"（表中各行的未取整数值，见 _bench_common.py）。

    python benchmarks/bench_train.py                       # 缺省 4 × 512 个 token
    python benchmarks/bench_train.py --out benchmarks/results/bench_train-$(date +%F).json
    python benchmarks/bench_train.py --batch 1 --seq 128   # 快速试跑
    python benchmarks/bench_train.py --smoke               # 同一条路径、极小尺寸（1 层 smoke 学生与 1 层小教师、2×16）
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from _bench_common import (
    MALLOC_TUNED, SMOKE_MODEL, Usage, hf_model_from_params, measured, model_config, parse_with_smoke, print_table,
    run_workers, step_rows, write_result,
)

TEACHER_SHAPE = dict(
    hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
    vocab_size=151936, max_seq_len=32768, rope_theta=1e6, tie_word_embeddings=True,
)
# GPU 检查用的教师（issue 11）：Qwen2.5-1.5B 的形状（隐藏 1536、28 层、12 头、2 个 KV 头、前馈 8960、共享嵌入）。
TEACHER_SHAPES = {
    "0.5b": TEACHER_SHAPE,
    "1.5b": dict(TEACHER_SHAPE, hidden_size=1536, num_layers=28, num_heads=12, intermediate_size=8960),
}
# 每块卡的 bf16 稠密峰值算力（TFLOPS），用于模型算力利用率 MFU；其他卡用 --peak-tflops 指定。
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
# --smoke 的教师：smoke 学生的形状，隐藏维度与前馈更宽（96 / 192，与学生不同），层数由 --teacher-layers 决定。
SMOKE_TEACHER_SHAPE = {**SMOKE_MODEL, "hidden_size": 96, "intermediate_size": 192}
REAL_VOCAB = 151665
VARIANTS = ("ours", "ours_compile", "ours_teacher_bf16", "baseline", "baseline_teacher_bf16")
# 每个本项目变体的参照：只差实现本身（教师精度相同）。
REFERENCE = {"ours": "baseline", "ours_compile": "baseline", "ours_teacher_bf16": "baseline_teacher_bf16"}


def references(bf16: bool, rows: str = ",".join(REFERENCE)) -> dict:
    """所选变体（--rows）的参照。--bf16（GPU 检查）时两边的教师本来就都是 bf16：baseline 已是 bf16 教师，不另跑一遍。"""
    chosen = [name.strip() for name in rows.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in REFERENCE]
    if unknown or not chosen:
        raise SystemExit(f"--rows {rows!r}: expected a comma-separated subset of {', '.join(REFERENCE)}")
    return {name: "baseline" if bf16 else REFERENCE[name] for name in chosen}


def completed(results: dict, refs: dict) -> dict:
    """两边都跑完了的（变体, 参照）对：一边失败（例如参照被内存不足杀掉）时其余的对照样成行，失败记在 results 里。"""
    return {name: ref for name, ref in refs.items() if "step_s" in results[name] and "step_s" in results[ref]}
# --smoke 的缺省值（显式参数仍然优先）：分块 8 个 token，让 32 个 token 真的分成 4 块。
SMOKE = dict(batch=2, seq=16, steps=2, teacher_layers=1, student="smoke", real_vocab=250, chunk_size=8)


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """蒸馏训练步基准共用的参数（bench_cache 也用）：批、块长、步数、学生、教师形状与层数、真实词表、分块、线程。"""
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="每个变体的训练步数（第一步为预热）")
    p.add_argument("--teacher-layers", type=int, default=None, help="教师层数（缺省为教师形状的层数；调小可快速试跑）")
    p.add_argument("--teacher-shape", choices=sorted(TEACHER_SHAPES), default="0.5b", help="教师形状")
    p.add_argument("--student", default="student-123m", help="学生的预设名；smoke 为 _bench_common.SMOKE_MODEL")
    p.add_argument("--real-vocab", type=int, default=REAL_VOCAB, help="真实词表大小（其后的列被排除）")
    p.add_argument("--chunk-size", type=int, default=256, help="分块损失每块的 token 数")
    p.add_argument("--threads", type=int, default=os.cpu_count())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu 或 cuda（GPU 检查用）")
    p.add_argument("--bf16", action="store_true", help="学生 bf16 autocast，两边教师都用 bf16 权重（GPU 检查用）")
    p.add_argument("--peak-tflops", type=float, default=None, help="设备 bf16 峰值 TFLOPS（缺省按卡名查表）")
    p.add_argument("--rows", default=",".join(REFERENCE), help="要跑的本项目变体（各带它的参照），逗号分隔 / our "
                   "variants to run, each with its reference: " + ", ".join(REFERENCE))
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parse_with_smoke(p, argv, SMOKE)


def _configs(args):
    from functional_lm import ModelConfig

    student = model_config(args.student)
    shape = SMOKE_TEACHER_SHAPE if args.smoke else TEACHER_SHAPES[args.teacher_shape]
    layers = args.teacher_layers if args.teacher_layers is not None else shape["num_layers"]
    teacher = ModelConfig(**{**shape, "num_layers": layers})
    return student, teacher


def _batch(args):
    from functional_lm.data.loader import Batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.real_vocab, (args.batch, args.seq + 1), generator=g)
    batch = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), torch.ones(args.batch, args.seq, dtype=torch.bool))
    return batch.to(args.device)


def initial_weights(args, teacher_bf16: bool) -> tuple[dict, dict]:
    """两边共用的初始权重：(学生参数 float32、种子 0, 教师参数、种子 1、bf16 教师直接以 bf16 生成)。"""
    from functional_lm import init_params

    scfg, tcfg_model = _configs(args)
    dtype = torch.bfloat16 if teacher_bf16 or args.bf16 else torch.float32
    return init_params(scfg, seed=0, device=args.device), init_params(tcfg_model, seed=1, dtype=dtype, device=args.device)


def _ours(args, teacher_bf16=False, compile=False):
    """本项目的训练步（与 functional_lm.kd.trainer.train 中的一步相同的组成）。"""
    from functional_lm import TrainingConfig
    from functional_lm.models.decoder import forward_hidden
    from functional_lm.kd.step import build_optimizer
    from functional_lm.kd.objective import Model, distill_loss, teacher_hidden_states

    scfg, tcfg_model = _configs(args)
    teacher_bf16 = teacher_bf16 or args.bf16
    tcfg = TrainingConfig(loss_chunk_size=args.chunk_size, teacher_bf16=teacher_bf16, compile=compile, bf16=args.bf16)
    student_fwd = torch.compile(forward_hidden) if compile else forward_hidden
    teacher_fwd = torch.compile(forward_hidden) if compile else forward_hidden
    student, teacher_params = initial_weights(args, teacher_bf16)
    params = {k: v.requires_grad_(True) for k, v in student.items()}
    teacher = Model(teacher_params, tcfg_model)
    optimizer = build_optimizer(params, tcfg, fused=args.device.startswith("cuda"))
    batch = _batch(args)

    def step():
        t_hidden = teacher_hidden_states(teacher, batch.input_ids, teacher_fwd)
        loss, _ = distill_loss(
            params, scfg, batch, teacher, t_hidden, tcfg, real_vocab_size=args.real_vocab, forward_fn=student_fwd
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), tcfg.gradient_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _baseline(args, teacher_bf16=False, alpha=0.5, temperature=2.0):
    """基线：transformers 模型（与本项目同一组初始权重）+ 完整 logits 的 KD 损失（常见写法）。"""
    scfg, tcfg_model = _configs(args)
    student_params, teacher_params = initial_weights(args, teacher_bf16)
    student = hf_model_from_params(student_params, scfg).to(args.device).train()
    teacher = hf_model_from_params(teacher_params, tcfg_model, share=True).to(args.device)
    teacher = teacher.eval().requires_grad_(False)
    decay = [p for n, p in student.named_parameters() if not (n.endswith("bias") or n.endswith("norm.weight"))]
    keep = [p for n, p in student.named_parameters() if n.endswith("bias") or n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": keep, "weight_decay": 0.0}], lr=3e-4, betas=(0.9, 0.95)
    )
    batch = _batch(args)
    real_vocab = args.real_vocab

    def step():
        with torch.no_grad():
            t_logits = teacher(batch.input_ids).logits[..., :real_vocab].float()
        with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            s_logits = student(batch.input_ids).logits[..., :real_vocab].float()
        kd = F.kl_div(
            F.log_softmax(s_logits / temperature, -1).flatten(0, 1),
            F.log_softmax(t_logits / temperature, -1).flatten(0, 1),
            log_target=True, reduction="batchmean",
        )
        ce = F.cross_entropy(s_logits.flatten(0, 1), batch.labels.flatten())
        loss = alpha * temperature**2 * kd + (1 - alpha) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _setup(args):
    """子进程里的准备：线程数、OOM 优先级，返回这个变体的训练步函数。"""
    torch.set_num_threads(args.threads)
    try:  # 让内核在内存不足时优先杀掉这个进程（普通 KD 损失的峰值很高）
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        pass
    if args.worker.startswith("baseline"):
        return _baseline(args, teacher_bf16=args.worker == "baseline_teacher_bf16")
    bf16 = args.worker == "ours_teacher_bf16"
    return _ours(args, teacher_bf16=bf16, compile=bf16 or args.worker == "ours_compile")


def worker(args):
    """子进程：跑 --steps 步并计时，结果（含计时各步的进程开销）以一行 JSON 写到 stdout。"""
    step = _setup(args)
    cuda = args.device.startswith("cuda")
    times, losses, usage = [], [], {}
    for i in range(args.steps):
        # 首步是预热（含编译），进程开销另记；只有一步时它也是计时步（与下面的 timed 一致）。
        with measured(usage, "timed" if i > 0 or args.steps == 1 else "warmup"):
            start = time.perf_counter()
            losses.append(step())  # float(loss) 已经等 GPU 算完这一步
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    timed = times[1:] or times
    # 峰值内存：CPU 上是进程的 max RSS；CUDA 上是设备内存的峰值（PyTorch 分配器记账）。
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    graphs = _compiled_graphs()
    print(json.dumps({"step_s": min(timed), "all_step_s": times, "peak_rss_mib": peak_mib, "losses": losses,
                      "compiled_graphs": graphs, "usage": usage.get("timed", Usage()).as_dict(),
                      "malloc_tuned": MALLOC_TUNED}))


def _compiled_graphs():
    """本进程里 dynamo 捕获的计算图个数：编译变体应大于 0（证明没有悄悄退回 eager）。"""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def step_flops(args) -> float:
    """一个训练步的模型 FLOPs（PaLM 附录 B 的算法）：学生训练 6N + 12·L·d·t、教师前向 2N + 4·L·d·t，每个 token。

    N 含输出投影（共享嵌入时就是嵌入矩阵），不含嵌入查表；t 为序列长度。"""
    scfg, tcfg_model = _configs(args)

    def matmul_params(cfg):
        from functional_lm.models.decoder import param_shapes

        blocks = sum(math.prod(shape) for key, shape in param_shapes(cfg).items()
                     if len(shape) == 2 and key not in ("model.embed_tokens.weight", "lm_head.weight"))
        return blocks + cfg.vocab_size * cfg.hidden_size  # 输出投影：共享与否都是一次 v×d 的乘法

    student = 6 * matmul_params(scfg) + 12 * scfg.num_layers * scfg.hidden_size * args.seq
    teacher = 2 * matmul_params(tcfg_model) + 4 * tcfg_model.num_layers * tcfg_model.hidden_size * args.seq
    return float(args.batch * args.seq * (student + teacher))


def _peak_tflops(args) -> float | None:
    """设备的 bf16 峰值算力：--peak-tflops，或按 CUDA 设备名查表；CPU 上为 None（不报告 MFU）。"""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def ratio_rows(results, tokens, refs=REFERENCE):
    """每个本项目变体四行：tokens/s、两行进程开销与峰值内存，参照是 refs 里它的参照；比值由步时与 RSS
    直接算出，进程开销行没有比值。"""
    rows = []
    for name, ref in refs.items():
        rows += step_rows(name, results[name], results[ref], tokens)
    return rows


def first_loss_rel_diff(results, refs=REFERENCE) -> dict:
    """每对（变体, 它的参照）第一步损失的相对差 |ℓ_ours − ℓ_ref| / |ℓ_ref|：同一组权重、同一批，应当只差舍入。"""
    return {name: abs(results[name]["losses"][0] - results[ref]["losses"][0]) / max(abs(results[ref]["losses"][0]), 1e-30)
            for name, ref in refs.items()}


def _comparisons(results, tokens, refs=REFERENCE) -> dict:
    """JSON 里每个本项目变体的 tokens/s、对它的参照的速度比与内存比，以及各参照的 tokens/s。"""
    out = {f"{ref}_tokens_per_s": round(tokens / results[ref]["step_s"], 1) for ref in sorted(set(refs.values()))}
    for name, ref in refs.items():
        mine, base = results[name], results[ref]
        out[name] = {
            "reference": ref,
            "tokens_per_s": round(tokens / mine["step_s"], 1),
            "speed_ratio": round(base["step_s"] / mine["step_s"], 3),
            "memory_ratio": round(mine["peak_rss_mib"] / base["peak_rss_mib"], 3),
        }
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    refs = references(args.bf16, args.rows)
    results = run_workers(__file__, argv, tuple(v for v in VARIANTS if v in refs or v in refs.values()))
    tokens = args.batch * args.seq
    teacher = "smoke-shaped" if args.smoke else f"Qwen2.5-{args.teacher_shape.upper()}-shaped"
    layers = _configs(args)[1].num_layers
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    summary = {
        "bench": "distill_train_step", "device": device, "threads": args.threads, "batch": args.batch, "seq": args.seq,
        "bf16": args.bf16, "student": args.student, "teacher": f"{teacher} ({layers} layers), random",
        "results": results,
    }
    peak = _peak_tflops(args)
    if peak and all("step_s" in r for r in results.values()):  # 模型算力利用率：模型 FLOPs / 步时 / 峰值
        flops = step_flops(args)
        summary["mfu"] = {name: round(flops / r["step_s"] / (peak * 1e12), 4) for name, r in results.items()}
    done = completed(results, refs)
    rows = ratio_rows(results, tokens, done)
    if done:
        summary.update(_comparisons(results, tokens, done))
        summary["first_loss_rel_diff"] = first_loss_rel_diff(results, done)
        summary["targets"] = {"speed_ratio_min": 1.5, "memory_ratio_max": 0.5}
    memory = "device peak" if args.device.startswith("cuda") else "peak RSS"
    print_table(f"distillation train step on {device}, {args.student} <- {teacher} teacher, {args.batch}x{args.seq}, "
                f"{'bf16' if args.bf16 else 'fp32'}, memory = {memory} (ratio = ours / its baseline: the same teacher "
                "precision, see REFERENCE)", rows, reference_label="baseline")
    if "mfu" in summary:
        print("MFU (model FLOPs / step time / peak bf16 FLOPs): "
              + ", ".join(f"{k} {v:.1%}" for k, v in summary["mfu"].items()))
    print(json.dumps(summary))
    write_result(args, __file__, argv, summary, rows)
    return {**summary, "rows": rows}


if __name__ == "__main__":
    main()
