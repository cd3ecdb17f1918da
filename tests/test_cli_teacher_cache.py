"""`functional-lm teacher-cache`：建出的缓存与直接跑教师的 top-k 相同、真实信号中断后续建逐字节相同、
设置不同的已有缓存被拒绝且不被改动、JSON-lines 导入经命令行往返、坏输入只给一段话。

教师是 2 层、隐藏 32 的随机小模型（词表 151,936，容得下离线 Qwen2.5 分词器）；数据取 conftest 写的
data.jsonl 的前 12 篇（1,044 个 token；块长 32、验证比例 0.2 → 24 个训练块、8 个验证块），让每次构建只要几秒。
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import full_disk_open, write_teacher_and_data

from functional_lm.cli import main
from functional_lm.config import ModelConfig

pytestmark = pytest.mark.usefixtures("qwen_tokenizer")

TEACHER = ModelConfig(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
    vocab_size=151936, max_seq_len=64, rope_theta=1e4,
)
SEQ = 32
K = 8
T = 2.0
VAL = 0.2


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """教师、12 篇的小数据文件 small.jsonl，以及所有测试共用的分词缓存目录。"""
    root = write_teacher_and_data(tmp_path_factory.mktemp("teacher-cache"), TEACHER)
    lines = (root / "data.jsonl").read_text().splitlines()[:12]
    (root / "small.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _args(root, out, *extra):
    """一次构建的命令行参数（不含子命令前的程序名）。"""
    return [
        "teacher-cache", "--teacher", str(root / "teacher"), "--data", str(root / "small.jsonl"),
        "--output-dir", str(out), "--top-k", str(K), "--temperature", str(T), "--seq-len", str(SEQ),
        "--val-fraction", str(VAL), "--cache-dir", str(root / "tokens"), "--device", "cpu", "--no-progress",
        *extra,
    ]


def _files(directory):
    """缓存目录树里除锁文件外的全部文件：相对路径 → 字节。"""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def _data(root, val_fraction=VAL, seq_len=SEQ, source="small.jsonl", split_seed=0):
    """与命令相同的 prepare_data 调用（复用分词缓存）：参照用的训练 / 验证块。"""
    from functional_lm.data import load_tokenizer, prepare_data

    return prepare_data(
        [str(root / source)], tokenizer=load_tokenizer(None), seq_len=seq_len, batch_size=4,
        val_fraction=val_fraction, seed=0, cache_dir=root / "tokens", progress=False, split_seed=split_seed,
    )


@pytest.fixture(scope="module")
def built(root):
    """一次完整的构建（进程内调用 main）；返回 (缓存目录 C, stderr)。"""
    out, err = root / "built", io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(_args(root, out, "--blocks-per-shard", "8"))
    assert code == 0, err.getvalue()
    return out, err.getvalue()


# ---------------------------------------------------------------- 构建的内容
def test_build_matches_teacher_topk_computed_directly(root, built):
    from functional_lm.hf import load_pretrained
    from functional_lm.losses import teacher_topk
    from functional_lm.models.decoder import forward
    from functional_lm.kd.teacher_cache import TeacherCache

    out, err = built
    data = _data(root)
    assert len(data.train) == 24 and len(data.val) == 8
    cfg, params = load_pretrained(root / "teacher", dtype=torch.float32)
    for split, blocks in (("train", [0, 13, 23]), ("val", [0, 7])):  # 首块、跨分片、末块（有补齐）
        cache = TeacherCache.open(out / split, verify=True)
        dataset = getattr(data, split)
        assert (cache.num_blocks, cache.seq_len, cache.top_k, cache.temperature) == (len(dataset), SEQ, K, T)
        assert cache.fingerprint["split"] == {"split": split, "val_fraction": VAL, "seed": 0}
        assert cache.fingerprint["document_mask"] is True and cache.real_vocab_size == 151665
        ids, log_probs, tail = cache.targets(blocks)
        input_ids, _, _, segments = dataset.examples(blocks, True)
        logits = forward(params, torch.from_numpy(input_ids), cfg, segment_ids=torch.from_numpy(segments))
        ref_ids, ref_lp, ref_tail = teacher_topk(logits, K, temperature=T, real_vocab_size=151665)
        assert torch.equal(ids, ref_ids)
        assert torch.all((log_probs - ref_lp).abs() <= ref_lp.abs() * 2.0**-11 + 1e-6)  # float16 舍入
        assert torch.allclose(tail, ref_tail, rtol=0, atol=1e-6)
    # 进度之外的最后一行是一行总结：块数、token 数、每 token 字节数、位置。
    last = err.strip().splitlines()[-1]
    per_token = K * 4 + K * 2 + 4  # ids int32、float16 log 概率、float32 尾部
    assert per_token * 1024 == 53248
    assert last == (f"teacher cache complete: train 24 blocks (768 tokens), val 8 blocks (256 tokens); 53.2 KB, "
                    f"52.0 bytes/token (top-k {K}, T=2, float16) in {out}")


def test_rerun_of_a_finished_cache_changes_nothing(root, built, tmp_path, capsys):
    out = tmp_path / "C"
    shutil.copytree(built[0], out)
    before = _files(out)
    assert main(_args(root, out, "--blocks-per-shard", "8")) == 0
    assert "teacher cache complete: train 24 blocks" in capsys.readouterr().err
    assert _files(out) == before


def test_mismatched_cache_is_refused_and_left_untouched(root, built, tmp_path, capsys):
    out = tmp_path / "C"
    shutil.copytree(built[0], out)
    before = _files(out)
    args = _args(root, out, "--blocks-per-shard", "8")
    args[args.index("--top-k") + 1] = "4"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "top-k (--top-k) differs: cache 8, this build 4" in err and "left untouched" in err
    assert "Traceback" not in err
    assert _files(out) == before


# ---------------------------------------------------------------- 真实信号：中断、续建、逐字节相同
def test_sigint_stops_between_shards_and_rerun_resumes_byte_identically(root, tmp_path):
    out = tmp_path / "C"
    argv = [sys.executable, "-m", "functional_lm", *_args(root, out, "--blocks-per-shard", "1")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    index = out / "train" / "index.json"
    deadline = time.monotonic() + 120  # 上限只防止测试挂住：第一个分片始终不提交就是失败
    while not (index.exists() and any(s is not None for s in json.loads(index.read_text() or "{}").get("shards", []))):
        assert proc.poll() is None, proc.communicate()[1]
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no shard was ever committed: {proc.communicate()[1]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped: SIGINT received" in err and "rerun the same command to continue" in err
    shards = json.loads(index.read_text())["shards"]
    done = sum(s is not None for s in shards)
    assert 1 <= done < len(shards) == 24  # 停在分片之间：已提交的留着，其余未写
    assert not [p.name for p in (out / "train").iterdir() if p.name.endswith(".tmp")]

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    reference = tmp_path / "reference"
    assert main(_args(root, reference, "--blocks-per-shard", "1")) == 0
    resumed, whole = _files(out), _files(reference)
    assert sorted(resumed) == sorted(whole) and len(whole) == (1 + 3 * 24) + (1 + 3 * 8)  # index.json + 每分片 3 个
    assert all(resumed[name] == whole[name] for name in whole)


# ---------------------------------------------------------------- 导入
def _topk_row(j):
    """第 j 行：3 个互不相同的 id 与概率 1/2、1/4、1/8（尾部质量 1/8）。"""
    return {"ids": [j % 97, 100 + j % 89, 300 + j], "logprobs": [math.log(0.5), math.log(0.25), math.log(0.125)]}


def test_import_jsonl_round_trips_through_the_command(root, tmp_path, capsys):
    from functional_lm.kd.teacher_cache import TeacherCache

    data = _data(root, val_fraction=0.0, seq_len=8)
    rows = len(data.train) * 8
    topk = tmp_path / "topk.jsonl"
    topk.write_text("".join(json.dumps(_topk_row(j)) + "\n" for j in range(rows)))
    out = tmp_path / "C"
    argv = ["teacher-cache", "--import", str(topk), "--data", str(root / "small.jsonl"), "--output-dir", str(out),
            "--top-k", "3", "--seq-len", "8", "--val-fraction", "0", "--cache-dir", str(root / "tokens"),
            "--blocks-per-shard", "16", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"expecting {rows} rows ({len(data.train)} train blocks × 8 positions)" in err
    assert sorted(p.name for p in out.iterdir()) == ["train"]
    cache = TeacherCache.open(out / "train", verify=True)
    assert (cache.num_blocks, cache.top_k, cache.temperature) == (len(data.train), 3, T)
    assert cache.fingerprint["teacher_weights"].startswith("jsonl-sha256:")
    ids, log_probs, tail = cache.targets([0, len(data.train) - 1])
    for i, block in enumerate([0, len(data.train) - 1]):
        for p in (0, 7):
            row = _topk_row(block * 8 + p)
            assert ids[i, p].tolist() == row["ids"]
            assert log_probs[i, p].tolist() == pytest.approx(row["logprobs"], abs=1e-3)
            assert float(tail[i, p]) == pytest.approx(0.125, abs=1e-6)
    # 行数不对：点名文件与行数的一段话
    topk.write_text("".join(json.dumps(_topk_row(j)) + "\n" for j in range(rows - 1)))
    assert main(_set(argv, "--output-dir", str(tmp_path / "D"))) == 2
    assert f"ends after {rows - 1} rows" in capsys.readouterr().err


# ---------------------------------------------------------------- 坏输入：一段话、退出码 2
@pytest.mark.parametrize("change, expected", [
    (lambda a: [x for i, x in enumerate(a) if i not in (1, 2)], "give --teacher DIR (run a teacher checkpoint over the data), --teacher-url URL (a served teacher) or --import FILE"),
    (lambda a: _set(a, "--top-k", "0"), "--top-k must be a positive integer (tokens kept per position), got 0"),
    (lambda a: _set(a, "--top-k", "151666"), "--top-k 151666 exceeds the vocabulary: the tokenizer has 151665"),
    (lambda a: _set(a, "--temperature", "0"), "--temperature must be a finite number > 0, got 0.0"),
    (lambda a: _set(a, "--temperature", "-1"), "--temperature must be a finite number > 0, got -1.0"),
    (lambda a: _set(a, "--data", "/no/such/data.jsonl"), "/no/such/data.jsonl"),
    (lambda a: _set(a, "--seq-len", "65"), "--seq-len 65 exceeds the teacher's max_seq_len=64"),
    (lambda a: _set(a, "--document-mask", "maybe"), "--document-mask expects true/false, got 'maybe'"),
])
def test_bad_input_gives_one_paragraph(root, tmp_path, capsys, change, expected):
    out = tmp_path / "C"
    assert main(change(_args(root, out))) == 2
    err = capsys.readouterr().err
    assert err.startswith("functional-lm teacher-cache: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "train").exists()


def _set(args, option, value):
    """把参数表里 option 的值换成 value（没有时追加）。"""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


# ---------------------------------------------------------------- distill --teacher-cache（issue 14 第 3 项）
def _distill(root, out, *extra):
    """distill 的共同参数：小学生（词表 151,936），块长与验证比例同缓存，4 步，验证只用 1 批（全词表的验证最费时）。"""
    return [
        "distill", "--data", str(root / "small.jsonl"), "--output-dir", str(out), "--preset", "tiny",
        "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads", "1",
        "--seq-len", str(SEQ), "--val-fraction", str(VAL), "--temperature", str(T), "--max-steps", "4",
        "--batch-size", "2", "--save-interval", "4", "--eval-interval", "4", "--learning-rate", "0.01",
        "--warmup-steps", "1", "--eval-batches", "1", "--cache-dir", str(root / "tokens"), "--device", "cpu",
        "--no-progress", *extra,
    ]


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _student(out):
    from functional_lm.hf import load_pretrained

    return load_pretrained(out / "student")[1]


def test_one_cache_trains_students_of_two_seeds_each_equal_to_its_live_top_k_run(root, built, tmp_path):
    # 一份缓存（划分种子缺省 0，只建一次）训练 seed 0 与 seed 5 的学生；各自与同 seed、在线教师 --top-k K 的运行比，
    # 每步损失与最终参数相差 ≤ 1e-6。能这么紧是因为在线 top-k 的 log 概率同样经 float16 取整（stored_log_probs），
    # 两边的目标是同一批数；剩下的只是 float32 的求和次序（缓存建时教师 4 块一批，训练时 2 块一批）。
    cache = built[0]
    runs = {}
    for seed in (0, 5):
        for name, extra in (("cached", ["--teacher-cache", str(cache)]),
                            ("live", ["--teacher", str(root / "teacher"), "--top-k", str(K)])):
            out = tmp_path / f"{name}-{seed}"
            assert main(_distill(root, out, "--seed", str(seed), "--log-interval", "1", *extra)) == 0
            training = json.loads((out / "run.json").read_text())["training"]
            assert (training["seed"], training["split_seed"]) == (seed, 0)
            runs[name, seed] = ([(r["step"], r["loss"]) for r in _records(out, "train")], _student(out))
    for seed in (0, 5):
        (cached_losses, cached), (live_losses, live) = runs["cached", seed], runs["live", seed]
        assert [step for step, _ in cached_losses] == [step for step, _ in live_losses] == [1, 2, 3, 4]
        assert all(abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(cached_losses, live_losses)), seed
        for key, value in live.items():
            assert (value - cached[key]).abs().max() <= 1e-6, (seed, key)
    # 两个 seed 的学生确实不同（初始化与数据顺序都不同），否则上面的相等什么也没证明
    (losses0, student0), (losses5, student5) = runs["cached", 0], runs["cached", 5]
    assert max(abs(a - b) for (_, a), (_, b) in zip(losses0, losses5)) > 1e-3
    assert max(float((student0[k] - student5[k]).abs().max()) for k in student0) > 1e-3
    saved = json.loads((tmp_path / "cached-0" / "run.json").read_text())
    assert "teacher" not in saved["run"] and saved["run"]["teacher_cache"] == str(cache.resolve())
    final = _records(tmp_path / "cached-0", "eval")[-1]
    assert final["kl_cache_student"] > 0 and 0.0 <= final["top1_agreement"] <= 1.0 and final["student_ppl"] > 1


def test_split_seed_chooses_the_split_and_seed_is_its_deprecated_alias(root, built, tmp_path, capsys):
    from functional_lm.hf import load_pretrained
    from functional_lm.losses import teacher_topk
    from functional_lm.models.decoder import forward
    from functional_lm.kd.teacher_cache import TeacherCache

    out = tmp_path / "C"
    shutil.copytree(built[0], out)
    before = _files(out)
    # 旧的 --seed 0 就是划分种子 0：已建好的缓存原样认得（什么都不重写），只多一行提示
    assert main(_args(root, out, "--blocks-per-shard", "8", "--seed", "0")) == 0
    err = capsys.readouterr().err
    assert "note: teacher-cache --seed is deprecated, use --split-seed 0 (the same split)" in err
    assert _files(out) == before
    # 另一个划分种子：用文字说明哪里不同，缓存不动
    assert main(_args(root, out, "--blocks-per-shard", "8", "--split-seed", "3")) == 2
    err = capsys.readouterr().err
    assert "the split seed (--split-seed) differs: cache 0, this build 3" in err and _files(out) == before
    assert main(_args(root, tmp_path / "D", "--seed", "1", "--split-seed", "2")) == 2
    assert "--seed 1 and --split-seed 2 disagree" in capsys.readouterr().err
    # 划分种子 3 的缓存装的是划分 3 的训练块：与按划分 3 打包的块逐个相同（划分 0 的块不同，所以这能失败）
    assert main(_args(root, tmp_path / "E", "--split-seed", "3")) == 0
    cache = TeacherCache.open(tmp_path / "E" / "train")
    assert cache.fingerprint["split"] == {"split": "train", "val_fraction": VAL, "seed": 3}
    three, zero = _data(root, split_seed=3).train, _data(root).train
    blocks = [0, len(three) - 1]
    inputs, _, _, segments = three.examples(blocks, True)
    assert cache.num_blocks == len(three) and not np.array_equal(inputs, zero.examples(blocks, True)[0])
    cfg, params = load_pretrained(root / "teacher", dtype=torch.float32)
    logits = forward(params, torch.from_numpy(inputs), cfg, segment_ids=torch.from_numpy(segments))
    assert torch.equal(cache.targets(blocks)[0], teacher_topk(logits, K, temperature=T, real_vocab_size=151665)[0])
    # distill 的划分种子与缓存的不同：一段话，用文字点名
    capsys.readouterr()
    assert main(_distill(root, tmp_path / "run", "--teacher-cache", str(out), "--split-seed", "3")) == 2
    err = capsys.readouterr().err
    assert "the split seed (--split-seed) differs: cache 0, this run 3" in err and "Traceback" not in err
    assert main(_distill(root, tmp_path / "run3", "--teacher-cache", str(tmp_path / "E"), "--split-seed", "3",
                         "--max-steps", "1", "--seed", "7")) == 0


def test_a_copied_and_touched_data_file_uses_the_cache_and_one_changed_word_is_refused(root, built, tmp_path, capsys):
    from functional_lm.data.store import crc32_file

    cache = built[0]
    copy = tmp_path / "elsewhere" / "copy.jsonl"  # 另一个路径、另一个名字、另一个修改时间，字节相同
    copy.parent.mkdir()
    shutil.copyfile(root / "small.jsonl", copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))

    def distill(data, out, teacher_cache=cache):
        return main(_set(_distill(root, out, "--teacher-cache", str(teacher_cache), "--max-steps", "2"),
                         "--data", str(data)))

    assert distill(root / "small.jsonl", tmp_path / "here") == 0
    assert distill(copy, tmp_path / "there") == 0
    here, there = _student(tmp_path / "here"), _student(tmp_path / "there")
    assert all(torch.equal(here[k], there[k]) for k in here)
    # 这个版本之前建的缓存（数据指纹带分词缓存的键与各文件的 CRC-32）：校验和相符，照样接受
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    store = _data(root).store
    # 旧版本的分词缓存只有 tokens.bin、offsets.npy（与 mask.bin）；lines.npy 是之后才加的
    files = {p.name: crc32_file(p) for p in sorted(store.path.iterdir()) if p.name not in ("index.json", "lines.npy")}
    for split in ("train", "val"):
        index = json.loads((old / split / "index.json").read_text())
        index["fingerprint"]["data"] = {"key": store.meta["key"], "files": files, "num_tokens": store.num_tokens}
        (old / split / "index.json").write_text(json.dumps(index))
    assert distill(copy, tmp_path / "from-old", old) == 0
    from_old = _student(tmp_path / "from-old")
    assert all(torch.equal(here[k], from_old[k]) for k in here)
    # 改一个词：用文字说是数据不同，点名缓存
    edited = tmp_path / "edited.jsonl"
    edited.write_text(copy.read_text().replace("lazy", "sleepy", 1))
    capsys.readouterr()
    assert distill(edited, tmp_path / "edited") == 2
    err = capsys.readouterr().err
    assert "the data's tokens differ (different text or a different file)" in err
    assert f"teacher cache {cache / 'train'} was built for something else" in err and "Traceback" not in err
    assert distill(edited, tmp_path / "edited-old", old) == 2
    assert "the cache predates content fingerprints" in capsys.readouterr().err


# ---------------------------------------------------------------- 坏输入（外部测试者的报告）：一段话、尽早拒绝
def _one_paragraph(err, command="teacher-cache"):
    """stderr 以一段话的错误结束（之前可以有进度行）：命令名开头、一行、没有回溯；返回这段话。"""
    lines = err.splitlines()
    assert lines and lines[-1].startswith(f"functional-lm {command}: error: "), err
    assert sum("error:" in line for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def _no_work(monkeypatch):
    """分词打包一开始就让测试失败：证明拒绝发生在任何重活之前。"""
    import functional_lm.data

    def refuse(*_args, **_kwargs):
        raise AssertionError("prepare_data ran: the refusal came after the heavy work started")

    monkeypatch.setattr(functional_lm.data, "prepare_data", refuse)


def _copy_of(built, tmp_path):
    out = tmp_path / "C"
    shutil.copytree(built[0], out)
    return out


def test_help_shows_the_required_options_in_a_required_group(capsys):
    with pytest.raises(SystemExit) as info:
        main(["teacher-cache", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    sections = re.split(r"\n(?=\S[^\n]*:\n)", text)
    required = [s for s in sections if s.startswith("required arguments / 必需参数:")]
    assert len(required) == 1, text
    for option in ("--output-dir C", "--top-k K", "--teacher DIR", "--import FILE"):
        assert option in required[0]
    others = "".join(s for s in sections[1:] if s is not required[0])  # 第一段是 usage 与说明
    assert "--output-dir" not in others and "--top-k" not in others
    assert "--output-dir C --top-k K" in text.split("\n\n")[0]  # usage 行里它们不带方括号


def test_a_teacher_with_nan_weights_is_refused_before_anything_is_committed(root, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "nan-teacher"
    shutil.copytree(root / "teacher", teacher)
    weights = teacher / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "C"
    args = _set(_args(root, out), "--teacher", str(teacher))
    assert main(args) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert str(teacher) in err and "non-finite" in err and "blocks 0, 1, 2, 3 " in err
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["complete"] is False and all(entry is None for entry in index["shards"])


def test_an_output_dir_that_cannot_be_created_is_refused_before_any_work(root, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "C"  # mkdir 失败：ENOTDIR（以 root 运行也一样）
    _no_work(monkeypatch)
    assert main(_args(root, out)) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert f"output directory {out} cannot be written" in err and "[ENOTDIR]" in err
    assert "choose another --output-dir" in err


def test_a_full_disk_is_one_paragraph_and_the_build_resumes(root, built, tmp_path, capsys, monkeypatch):
    import functional_lm.kd.cache_build as cb

    out = tmp_path / "C"
    monkeypatch.setattr(cb, "open", full_disk_open(".ids-00001.bin.tmp"), raising=False)  # 分片 1 的 ids 写不进去
    assert main(_args(root, out, "--blocks-per-shard", "8")) == 1
    monkeypatch.undo()
    err = _one_paragraph(capsys.readouterr().err)
    assert str(out / "train" / ".ids-00001.bin.tmp") in err and "the disk is full" in err
    assert "1 of 3 shards" in err and "kept" in err and "free some space" in err.lower()
    assert main(_args(root, out, "--blocks-per-shard", "8")) == 0  # 同一条命令续建，结果与一次建完的相同
    assert _files(out) == _files(built[0])


def test_a_binary_import_file_is_named_with_its_line(root, tmp_path, capsys):
    topk = tmp_path / "topk.jsonl"
    topk.write_bytes(json.dumps(_topk_row(0)).encode() + b"\n\x89PNG\r\n\x1a\n\x00\xff\xfe binary\n")
    argv = ["teacher-cache", "--import", str(topk), "--data", str(root / "small.jsonl"), "--output-dir",
            str(tmp_path / "C"), "--top-k", "3", "--seq-len", "8", "--val-fraction", "0", "--cache-dir",
            str(root / "tokens"), "--no-progress"]
    assert main(argv) == 2
    err = _one_paragraph(capsys.readouterr().err)
    assert f"{topk}:2: " in err and "UTF-8" in err


@pytest.fixture(scope="module")
def one_shard(root):
    """默认 64 块一个分片的构建：训练集只有分片 0，蒸馏的第一步就读到它。"""
    out = root / "one-shard"
    assert main(_args(root, out)) == 0
    return out


@pytest.mark.parametrize("name", ["ids-00000.bin", "logprobs-00000.bin"])
def test_distill_names_a_shard_file_damaged_in_place(root, one_shard, tmp_path, capsys, name):
    out = tmp_path / "C"
    shutil.copytree(one_shard, out)
    damaged = out / "train" / name
    data = bytearray(damaged.read_bytes())
    for offset in range(100, len(data), 997):
        data[offset] ^= 0xFF
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_distill(root, tmp_path / "run", "--teacher-cache", str(out))) == 2
    err = _one_paragraph(capsys.readouterr().err, "distill")
    assert str(damaged) in err and "checksum" in err
    assert f"--output-dir {out} " in err


def _edit_index(path, change):
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def test_distill_advice_for_an_incomplete_cache_names_the_build_output_dir(root, built, tmp_path, capsys):
    out = _copy_of(built, tmp_path)

    def unfinish(index):
        index["shards"][2], index["complete"] = None, False

    _edit_index(out / "train" / "index.json", unfinish)
    assert main(_distill(root, tmp_path / "run", "--teacher-cache", str(out))) == 2
    err = _one_paragraph(capsys.readouterr().err, "distill")
    assert f"{out / 'train'} is incomplete (2 of 3 shards written)" in err
    assert f"functional-lm teacher-cache --teacher DIR --output-dir {out} --top-k {K}" in err
    assert "--blocks-per-shard 8" in err and f"output directory {out / 'train'}" not in err


@pytest.mark.parametrize("case", ["index deleted", "split directory given"])
def test_distill_with_no_index_says_what_to_do(root, built, tmp_path, capsys, case):
    out = _copy_of(built, tmp_path)
    if case == "index deleted":
        (out / "train" / "index.json").unlink()
        given, expected = out, [f"no teacher cache in {out / 'train'} (index.json is missing)", f"--output-dir {out} "]
    else:
        given, expected = out / "train", [f"--teacher-cache {out / 'train'} holds one split of a teacher cache",
                                          f"pass --teacher-cache {out}"]
    assert main(_distill(root, tmp_path / "run", "--teacher-cache", str(given))) == 2
    err = _one_paragraph(capsys.readouterr().err, "distill")
    assert all(text in err for text in expected) and "delete" not in err


def test_distill_refuses_teacher_together_with_teacher_cache(root, built, tmp_path, capsys):
    run = tmp_path / "run"
    argv = _distill(root, run, "--teacher", str(root / "teacher"), "--teacher-cache", str(built[0]))
    assert main(argv) == 2
    err = _one_paragraph(capsys.readouterr().err, "distill")
    assert "--teacher" in err and "--teacher-cache" in err and "not both" in err
    assert not run.exists()


@pytest.mark.parametrize("source", ["teacher", "cache"])
def test_distill_checks_top_k_before_any_work(root, built, tmp_path, capsys, monkeypatch, source):
    _no_work(monkeypatch)
    if source == "teacher":
        extra, expected = ("--teacher", str(root / "teacher"), "--top-k", "999999"), \
            "--top-k 999999 exceeds the vocabulary: the tokenizer has 151665 real tokens"
    else:
        extra, expected = ("--teacher-cache", str(built[0]), "--top-k", "4"), \
            f"--top-k 4 differs from the teacher cache's K = {K}"
    assert main(_distill(root, tmp_path / "run", *extra)) == 2
    assert expected in _one_paragraph(capsys.readouterr().err, "distill")
