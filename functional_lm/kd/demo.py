"""离线默认演示：``functional-lm distill`` 不带 --teacher 时运行，全程离线、只用 CPU。

步骤：
    1. 离线 Qwen2.5 分词器 + 内置语料（CPython 自带的 pydoc_data.topics 英文文档）；
    2. 用交叉熵在语料上训练一个小教师（预设 demo-teacher），存成 HF 检查点并缓存在
       ``~/.cache/functional_lm/demo/`` 下，之后的运行直接复用；
    3. 用规格书的损失 α·T²·KL + (1−α)·CE 把教师蒸馏进更小的学生（预设 demo-student）；
    4. 对照：同一个学生、同样的步数，只用交叉熵训练（α = 0）——报告展示蒸馏改变了什么（只报告，不断言）；
    5. 在线蒸馏的学生：前一半步数与第 3 步相同（离线预热），后一半每步由学生自己写续写、教师逐 token 打分
       （反向 KL，λ = 1），总步数相同；
    6. 在验证集上评估四者（离线指标，以及学生采样续写上教师的反向 KL 与 NLL），打印各自的采样续写，
       写出 report.md、损失曲线与在线指标曲线。
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from functional_lm.config import ModelConfig, TrainingConfig, cache_root, get_preset
from functional_lm.runs.rundir import materialize_tokenizer, writing
from functional_lm.errors import Interrupted

__all__ = [
    "demo_training_defaults", "teacher_training_config", "student_configs", "curve_labels", "report_notes", "run_demo",
    "DEMO_SEQ_LEN",
]

DEMO_SEQ_LEN = 64  # 演示的训练块长度


def _demo_cache() -> Path:
    """演示教师的缓存目录：缓存根目录下的 demo/（环境变量 FUNCTIONAL_LM_DEMO_CACHE 可改，测试用它隔离）。"""
    return Path(os.environ.get("FUNCTIONAL_LM_DEMO_CACHE", cache_root() / "demo"))


def demo_training_defaults() -> dict[str, Any]:
    """演示中学生的训练配置（可被配置文件与命令行覆盖）：几分钟内在 2 核 CPU 上跑完。"""
    return {
        "batch_size": 4,
        "learning_rate": 3e-3,
        "warmup_steps": 20,
        "max_steps": 120,
        "log_interval": 10,
        "eval_interval": 40,
        "save_interval": 120,
        "eval_batches": 4,
        "loss_chunk_size": 256,
        "keep_last": 1,
        "prompt_length": 32,
        "max_new_tokens": 32,
        "on_policy_eval": True,
    }


def teacher_training_config() -> TrainingConfig:
    """演示教师的预训练配置：纯交叉熵（α = 0，没有教师）。"""
    return TrainingConfig(
        batch_size=4, learning_rate=3e-3, warmup_steps=20, max_steps=200, alpha=0.0,
        log_interval=25, eval_interval=10_000, save_interval=10_000, eval_batches=4,
        loss_chunk_size=256, keep_last=1,
    )


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _demo_teacher(
    tokenizer: Any, seq_len: int, seed: int, progress: bool, cache_dir: Any = None, tokenizer_dir: Any = None,
    device: Any = None,
) -> tuple[Path, bool]:
    """返回演示教师的检查点目录（没有缓存时先在本进程训练）与“是否新训练”。多进程时只由秩 0 调用。"""
    from functional_lm.data import prepare_data
    from functional_lm.hf import save_pretrained
    from functional_lm.models.decoder import init_params
    from functional_lm.kd.trainer import train
    from functional_lm.kd.objective import Model

    cfg = get_preset("demo-teacher")
    tcfg = teacher_training_config().replace(seed=seed)
    corpus = ("pydoc_data.topics", sys.version_info[:2], tokenizer.real_vocab_size, seq_len)
    # split_seed 不进键：教师的数据按上面的 seed 划分（prepare_data 的 split_seed 缺省即 seed），
    # 这个字段出现之前缓存的演示教师照常复用
    settings = {k: v for k, v in tcfg.to_dict().items() if k != "split_seed"}
    target = _demo_cache() / f"teacher-{_fingerprint(cfg.to_dict(), settings, corpus)}"
    if (target / "model.safetensors").is_file():
        return target, False
    print(f"[demo] training the demo teacher ({tcfg.max_steps} steps, cached in {target})", file=sys.stderr)
    data = prepare_data(
        None, tokenizer=tokenizer, seq_len=seq_len, batch_size=tcfg.batch_size, val_fraction=0.05,
        seed=seed, model_config=cfg, progress=progress, cache_dir=cache_dir,
    )
    # 训练目录名固定：被中断的教师预训练下次自动从它的最新检查点继续。
    scratch = target.parent / f".{target.name}-run"
    import torch

    from functional_lm.distributed import Dist

    result = train(
        Model(init_params(cfg, seed=seed + 1), cfg), None, data, tcfg, scratch, resume=True,
        real_vocab_size=tokenizer.real_vocab_size, progress=progress, info=Dist(device=device or torch.device("cpu")),
    )
    if result.interrupted:
        raise Interrupted(f"demo teacher training interrupted at step {result.step}; run again to continue")
    save_pretrained(result.params, cfg, target, tokenizer=tokenizer_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return target, True


def _samples(models: Mapping[str, Any], tokenizer: Any, prompts: list[list[int]], seed: int) -> dict[str, str]:
    """每个模型对同一组提示采样续写（温度 0.8、top-k 50，种子固定；只在真实词表里取，嵌入的填充行不会被采到）。"""
    from functional_lm.generate import generate

    texts = {}
    for name, model in models.items():
        pieces = []
        for prompt in prompts:
            out = generate(
                model.params, model.cfg, [prompt], 24, temperature=0.8, top_k=50, seed=seed,
                eos_token_id=tokenizer.eos_token_id, vocab_limit=tokenizer.real_vocab_size,
            )
            new = out[0, len(prompt) :].tolist()
            pieces.append(f"{tokenizer.decode(prompt)!r} → {tokenizer.decode(new)!r}")
        texts[name] = "\n".join(pieces)
    return texts


def _announce(tcfg: TrainingConfig, seq_len: int) -> None:
    """开始时把演示自己的训练设置打印出来（它们不同于 TrainingConfig 的默认值）。"""
    shown = ", ".join(f"{k}={getattr(tcfg, k)}" for k in demo_training_defaults())
    print(f"[demo] settings: seq_len={seq_len}, {shown} (override any with --field-name)", file=sys.stderr)


def student_configs(tcfg: TrainingConfig) -> dict[str, TrainingConfig]:
    """三个学生的训练配置：同样的初始化、数据、步数与学习率表。
    distilled：离线蒸馏（不生成）；ce_only：α = 0；on_policy：on_policy_start 之前同 distilled（离线预热，
    缺省为一半步数），之后每步以概率 λ（缺省 1）由学生写续写、教师打分。"""
    offline = tcfg.replace(on_policy_fraction=0.0, teacher_generated_fraction=0.0)
    online = tcfg.replace(
        on_policy_fraction=tcfg.on_policy_fraction or 1.0, on_policy_start=tcfg.on_policy_start or tcfg.max_steps // 2
    )
    return {"distilled": offline, "ce_only": offline.replace(alpha=0.0), "on_policy": online}


def _describe(name: str, cfg: TrainingConfig) -> str:
    online = f", on-policy λ={cfg.on_policy_fraction} from step {cfg.on_policy_start}" if cfg.generates else ""
    return f"[demo] training the {name} student (alpha={cfg.alpha}, T={cfg.temperature}{online})"


def _train_students(student_cfg, tcfg, teacher, data, tokenizer, tok_dir, out, resume, progress, info) -> dict[str, Any]:
    """三个学生（见 student_configs）依次训练。

    几次训练共用同一份数据：train() 按自己的布局另建加载器，不改动 data 里的任何状态。"""
    from functional_lm.models.decoder import init_params
    from functional_lm.kd.trainer import train
    from functional_lm.kd.objective import Model

    runs = {}
    for name, cfg in student_configs(tcfg).items():
        print(_describe(name, cfg), file=sys.stderr)
        student = Model(init_params(student_cfg, seed=tcfg.seed), student_cfg)
        runs[name] = train(
            student, teacher, data, cfg, out / name, resume=resume,
            real_vocab_size=tokenizer.real_vocab_size, tokenizer_dir=tok_dir, progress=progress, info=info,
        )
        if runs[name].interrupted:
            raise Interrupted(f"the {name} student stopped at step {runs[name].step}; continue with: functional-lm distill --resume")
    return runs


def _save_students(runs: Mapping[str, Any], student_cfg: ModelConfig, tok_dir: Path, out: Path) -> dict[str, Path]:
    """每个学生连同分词器存成 Hugging Face 目录（``functional-lm generate --prompt`` 直接可用）。"""
    from functional_lm.hf import save_pretrained

    paths = {}
    for name, result in runs.items():
        with writing(f"the {name} student", out / name / "student", result.last_checkpoint):
            paths[name] = save_pretrained(result.params, student_cfg, out / name / "student", tokenizer=tok_dir)
    return paths


def run_demo(
    student_cfg: ModelConfig, tcfg: TrainingConfig, run: Mapping[str, Any], out: Path, *, resume: bool,
    progress: bool, info: Any = None,
) -> Path:
    """离线演示的完整流程，返回运行目录。多进程时学生数据并行训练，教师、评估、采样与报告只在秩 0 上做。"""
    from functional_lm.data import check_vocab_compat, load_tokenizer, prepare_data
    from functional_lm.distributed import SINGLE, main_first, on_main
    from functional_lm.hf import load_pretrained
    from functional_lm.models.decoder import count_parameters, param_shapes
    from functional_lm.kd.objective import Model

    info = info or SINGLE
    tokenizer = load_tokenizer(run.get("tokenizer"))
    seq_len = int(run.get("seq_len") or min(DEMO_SEQ_LEN, student_cfg.max_seq_len))
    if info.is_main:
        _announce(tcfg, seq_len)

    def prepare_teacher() -> tuple[Path, Path, bool]:
        with writing("the tokenizer files", out / "tokenizer"):
            tok_dir = materialize_tokenizer(tokenizer, run.get("tokenizer"), out / "tokenizer")
        found = _demo_teacher(tokenizer, seq_len, tcfg.seed, progress, run.get("cache_dir"), tok_dir, info.device)
        return tok_dir, *found

    tok_dir, teacher_dir, fresh = on_main(prepare_teacher, info)
    teacher_cfg, teacher_params = load_pretrained(teacher_dir, device=info.device)
    teacher = Model(teacher_params, teacher_cfg)
    check_vocab_compat(tokenizer, student_cfg.vocab_size, teacher_cfg.vocab_size)

    def make_data():
        return prepare_data(
            run.get("data"), tokenizer=tokenizer, seq_len=seq_len, batch_size=tcfg.batch_size,
            val_fraction=tcfg.val_fraction, seed=tcfg.seed, cache_dir=run.get("cache_dir"),
            model_config=student_cfg, progress=progress and info.is_main, text_split=run.get("text_split", "paragraph"),
            split_seed=tcfg.split_seed,
        )

    with main_first(info):  # 秩 0 先分词建缓存，其余进程随后复用
        bundle = make_data()
    if info.is_main:
        print(
            f"[demo] teacher {count_parameters(teacher_params):,} params ({'trained now' if fresh else 'cached'}: "
            f"{teacher_dir}); student {sum(math.prod(s) for s in param_shapes(student_cfg).values()):,} params; "
            f"{tcfg.max_steps} steps of {tcfg.batch_size}×{seq_len} tokens",
            file=sys.stderr,
        )
    runs = _train_students(student_cfg, tcfg, teacher, bundle, tokenizer, tok_dir, out, resume, progress, info)
    if info.is_main:
        _wrap_up(runs, teacher, teacher_dir, student_cfg, tcfg, seq_len, tokenizer, tok_dir, bundle, out)
    return out


def _wrap_up(runs, teacher, teacher_dir, student_cfg, tcfg, seq_len, tokenizer, tok_dir, bundle, out) -> None:
    """秩 0：评估教师、保存三个学生、采样续写、写报告并打印摘要。"""
    from functional_lm.distributed import Dist
    from functional_lm.kd.on_policy import ON_POLICY_METRICS
    from functional_lm.runs.report import read_metrics, write_report
    from functional_lm.kd.evaluate import evaluate
    from functional_lm.kd.objective import Model

    device = next(iter(teacher.params.values())).device
    teacher_eval = evaluate(teacher, None, bundle.val_loader, tcfg, real_vocab_size=tokenizer.real_vocab_size,
                            max_batches=tcfg.eval_batches, info=Dist(device=device)) if bundle.val_loader else {}
    final = {"teacher": {"student_ppl": teacher_eval.get("student_ppl"), "val_ce": teacher_eval.get("val_ce")}}
    final |= {f"student ({name})": result.final_eval for name, result in runs.items()}
    students = _save_students(runs, student_cfg, tok_dir, out)
    prompts = [bundle.val.example(i)[0][:12].tolist() for i in range(min(2, len(bundle.val)))]
    models = {"teacher": teacher} | {f"student ({n})": Model(r.params, student_cfg) for n, r in runs.items()}
    samples = _samples(models, tokenizer, prompts, tcfg.seed)
    with writing("the report", out / "report.md"):
        report = write_report(
            out,
            title="functional_lm offline demo: off-policy distillation, cross-entropy only, on-policy distillation",
            configs={
                "teacher": teacher.cfg.to_dict(), "student": student_cfg.to_dict(), "training": tcfg.to_dict(),
                "teacher_training": teacher_training_config().to_dict(), "seq_len": seq_len,
            },
            final_metrics=final,
            curves={label: read_metrics(out / n) for n, label in curve_labels(tcfg, runs).items()},
            curve_key="ce",  # 三个学生的总损失 α 不同、不可比；交叉熵可比
            val_key="val_ce",
            reference=("teacher (val CE)", teacher_eval.get("val_ce")),
            eval_keys=ON_POLICY_METRICS,
            samples=samples,
            notes=report_notes(tcfg, teacher_dir, students),
        )
    _demo_cards(runs, students, teacher_dir, student_cfg, tcfg, seq_len, out)
    _print_summary(final, samples, report, students)


def _demo_cards(runs, students, teacher_dir, student_cfg, tcfg, seq_len, out) -> None:
    """每个演示学生的模型卡（runs/model_card.py）：教师是缓存里的演示教师（CE-only 学生没有教师）。"""
    from functional_lm.runs.model_card import write_model_card

    for name, path in students.items():
        cfg = student_configs(tcfg)[name]
        with writing(f"the {name} student's model card", path / "README.md"):
            write_model_card(
                path, out, title=f"functional_lm offline demo: the {name} student",
                base_model=None if cfg.alpha == 0 else str(teacher_dir), license=None, datasets=[],
                data="the embedded corpus (pydoc_data.topics)", training=cfg.to_dict(),
                extra={"seq_len": seq_len, "run": name}, steps=runs[name].step,
                tokens=runs[name].step * cfg.batch_size * cfg.gradient_accumulation_steps * seq_len,
                final=runs[name].final_eval, family=student_cfg.family)


def curve_labels(tcfg: TrainingConfig, names: Any) -> dict[str, str]:
    """报告图例里每个学生的名字。在线学生在离线预热（on_policy_start 步之前）里与离线蒸馏的学生是同一次训练，
    两条曲线在那里重合：图例写明这一点（图上它们也用不同的标记与线型画出）。"""
    start = student_configs(tcfg)["on_policy"].on_policy_start
    labels = {name: f"student ({name})" for name in names}
    if "on_policy" in labels and "distilled" in labels:
        labels["on_policy"] = f"student (on_policy; same as distilled until step {start}: warm-up)"
    return labels


def report_notes(tcfg: TrainingConfig, teacher_dir: Path, students: Mapping[str, Path]) -> list[str]:
    """report.md 的说明：各列与曲线的含义、在线学生的预热、教师与各学生的位置。"""
    start = student_configs(tcfg)["on_policy"].on_policy_start
    return [
        "student_ppl column for the teacher row is the teacher's own perplexity",
        "the CE-only student is trained with the same data, steps and schedule, alpha = 0",
        f"the on-policy student trains like the distilled one until step {start}, then on continuations it "
        "samples itself, graded by the teacher (reverse KL, no CE term)",
        "on_policy_reverse_kl / on_policy_teacher_nll: the teacher's per-token reverse KL KL(student‖teacher) "
        "and NLL on continuations each student samples from validation prompts (lower is better; the "
        "quantity on-policy distillation optimises); the other columns are measured on the data's own text",
        f"the loss plot shows the training cross-entropy of all {len(students)} students (small filled markers; "
        "cross-entropy because their total losses use different alpha), their validation cross-entropy (large "
        "hollow markers) and the teacher's (dotted line); each student has its own colour, marker and line style",
        f"until step {start} the on-policy student's curves lie exactly on the distilled student's (the same "
        "off-policy warm-up); the two are drawn with different markers and line styles so neither hides the other",
        f"teacher checkpoint: {teacher_dir}",
    ] + [f"{name} student: {path}" for name, path in students.items()]


def _print_summary(
    final: Mapping[str, Mapping[str, Any]], samples: Mapping[str, str], report: Path, students: Mapping[str, Path]
) -> None:
    print("\n== validation ==")
    for name, metrics in final.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "val_tokens")
        print(f"{name:>22}: {shown}")
    print("\n== sampled continuations (T=0.8, top-k 50) ==")
    for name, text in samples.items():
        print(f"-- {name}\n{text}")
    print("\n== students (Hugging Face format, with tokenizer) ==")
    for name, path in students.items():
        print(f"{name:>10}: {path}")
    first = next(iter(students.values()))
    print(f'try: functional-lm generate --model {first} --prompt "The for statement"')
    print(f"\nreport: {report}")
    sys.stdout.flush()
