"""基准脚本不会悄悄失效：每个脚本的 ``--smoke``（同一条代码路径、极小尺寸）在测试里真的跑一遍，
并核对它交出的数值与打印的比值表。

八个脚本都在本进程里通过 ``main(argv)`` 运行：返回值就是数据，不必解析输出；``bench_loss``、
``bench_train`` 与 ``bench_cache`` 的父进程照常为每个变体另起子进程（峰值内存取子进程自己的 max RSS，这是脚本的设计）。
本进程里被脚本改动的全局状态由 ``_run`` 复原：torch 线程数（bench_forward 会设置）与 dynamo 的编译缓存
（bench_forward、bench_generate、bench_on_policy 会编译）。每个脚本只跑一次（模块级夹具 ``smoke_run`` 记下结果），
所有测试都只读这份结果。不断言耗时。

进程开销行（单位 %user 与 faults/step，行名以 ``_sys``、``_faults`` 结尾）紧跟在各变体的吞吐行之后：
冒烟尺寸下它们可能为 0，只要求有限、非负，有参照（同一次运行里测得的参照实现）而没有比值。

冒烟运行的耗时主要是编译：bench_train 的两个编译变体各在新进程里重新追踪、编译（inductor 的磁盘缓存在
第二次起命中），bench_forward、bench_generate、bench_on_policy（解码步）各编译一次；其余几秒钟。
"""

import contextlib
import importlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"

# 进程开销行的单位与行名后缀（见 _bench_common.usage_rows）。
PROCESS_UNITS = ("%user", "faults/step")
PROCESS_SUFFIXES = ("_sys", "_faults")


def _with_usage(*names):
    """每个名字后面跟上它的两行进程开销：name、name_sys、name_faults。"""
    return [n for name in names for n in (name, name + "_sys", name + "_faults")]


# 每个脚本：冒烟运行的额外参数（线程数沿用本进程的设置）、表中应有的行（按顺序），
# 以及其中带比值的行（缺省为全部非进程开销行）。
SCRIPTS = {
    "bench_forward": dict(argv=["--threads", "{threads}"], rows=_with_usage("eager", "eager_nocheck", "compiled")),
    "bench_loss": dict(argv=[], rows=["peak_rss", "fwd_bwd_time", "fwd_bwd_sys", "fwd_bwd_faults"]),
    "bench_train": dict(
        argv=["--threads", "{threads}"],
        rows=[n for v in ("ours", "ours_compile", "ours_teacher_bf16") for n in (*_with_usage(v), v + "_peak_rss")],
    ),
    "bench_generate": dict(argv=[], rows=_with_usage("b1_eager", "b1_compiled")),
    "bench_attention": dict(
        argv=["--threads", "{threads}"],
        rows=_with_usage("eager_train_doc16", "compiled_train_doc16", "eager_infer_doc16", "compiled_infer_doc16"),
    ),
    "bench_data": dict(
        argv=[],
        rows=["tokenize", "tokenize_sys", "tokenize_faults", "tokenize_batch", "cache_build_w0", "cache_build_w2",
              "loader", "student_h100_estimate", "student_cpu_step", "loader_vs_student_step",
              "loader_sys", "loader_faults"],
        ratio_rows=["tokenize", "loader_vs_student_step"],
    ),
    "bench_cache": dict(
        argv=["--threads", "{threads}"],
        rows=["bytes_per_token_k4", "bytes_per_token_k8", *_with_usage("build", "step_from_cache"),
              "step_from_cache_peak_rss"],
        ratio_rows=["build", "step_from_cache", "step_from_cache_peak_rss"],  # 字节数的行没有参照
    ),
    "bench_on_policy": dict(
        argv=["--threads", "{threads}"],
        rows=["generate_s", "teacher_s", "student_loss_s", "step_s", "step_sys", "step_faults"],
    ),
}
# 打印 JSON 的脚本：最后一行就是返回值去掉 "rows"。
PRINTS_JSON = ("bench_forward", "bench_loss", "bench_train", "bench_generate", "bench_attention", "bench_cache",
               "bench_on_policy")


# ---------------------------------------------------------------- 运行与复原
@pytest.fixture(scope="module")
def bench_modules():
    """把 benchmarks/ 放进 sys.path 以便导入脚本（它们彼此共用 _bench_common.py），模块结束时复原。"""
    sys.path.insert(0, str(BENCH_DIR))
    before = set(sys.modules)
    yield importlib.import_module
    sys.path.remove(str(BENCH_DIR))
    for name in set(sys.modules) - before:
        if name == "_bench_common" or name.startswith("bench_"):
            del sys.modules[name]


def _run(module, argv):
    """运行 main(argv)，返回 (返回值, 打印到 stdout 的文本, dynamo 捕获的图数)；复原线程数与 dynamo 缓存。"""
    from torch._dynamo.utils import counters

    threads = torch.get_num_threads()
    torch._dynamo.reset()
    counters.clear()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = module.main(argv)
        graphs = int(counters["stats"]["unique_graphs"])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return result, out.getvalue(), graphs


def _smoke(bench_modules, name):
    spec = SCRIPTS[name]
    argv = ["--smoke"] + [a.format(threads=torch.get_num_threads()) for a in spec["argv"]]
    result, printed, graphs = _run(bench_modules(name), argv)
    return dict(name=name, spec=spec, result=result, printed=printed, graphs=graphs)


@pytest.fixture(scope="module")
def smoke_run(bench_modules):
    """按名字取某个脚本的冒烟结果；每个脚本只跑一次（失败也只跑一次，之后原样抛出）。"""
    cache = {}

    def get(name):
        if name not in cache:
            try:
                cache[name] = _smoke(bench_modules, name)
            except Exception as err:  # noqa: BLE001 —— 记下失败，别的测试不再重跑这个脚本
                cache[name] = err
        if isinstance(cache[name], Exception):
            raise cache[name]
        return cache[name]

    return get


@pytest.fixture(params=sorted(SCRIPTS))
def smoke(request, smoke_run):
    return smoke_run(request.param)


# ---------------------------------------------------------------- 所有脚本共同的断言
def _ratio_rows(spec):
    return spec.get("ratio_rows", [n for n in spec["rows"] if not n.endswith(PROCESS_SUFFIXES)])


def _is_process(r):
    return r["unit"] in PROCESS_UNITS


def test_every_expected_row_is_present(smoke):
    assert [r["name"] for r in smoke["result"]["rows"]] == smoke["spec"]["rows"]
    with_ratio = [r["name"] for r in smoke["result"]["rows"] if r["ratio"] is not None]
    assert with_ratio == _ratio_rows(smoke["spec"])
    # 进程开销行恰好是名字以 _sys / _faults 结尾的行，单位与后缀对应
    for r in smoke["result"]["rows"]:
        assert _is_process(r) == r["name"].endswith(PROCESS_SUFFIXES), r["name"]
        if _is_process(r):
            assert r["unit"] == ("%user" if r["name"].endswith("_sys") else "faults/step"), r["name"]


def test_every_figure_is_finite_and_positive(smoke):
    for r in smoke["result"]["rows"]:
        if _is_process(r):  # 进程开销：冒烟尺寸下可能为 0；两边都测了（冒烟运行里每个都有参照）
            assert r["reference"] is not None and r["ratio"] is None, r["name"]
            for value in (r["ours"], r["reference"]):
                assert isinstance(value, float) and math.isfinite(value) and value >= 0, (r["name"], value)
            continue
        sides = [r["ours"]] if r["reference"] is None else [r["ours"], r["reference"], r["ratio"]]
        for value in sides:
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (r["name"], value)


def test_ratio_is_ours_over_reference(smoke):
    # 比值由脚本从原始耗时 / 内存自己算出；这里用表中的两边重算，方向与数值都要一致。
    for r in smoke["result"]["rows"]:
        if r["reference"] is None or _is_process(r):
            assert r["ratio"] is None, r["name"]
        else:
            assert r["ratio"] == pytest.approx(r["ours"] / r["reference"], rel=1e-9), r["name"]


def test_process_settings_are_stated(smoke):
    # 表前有一行说明进程开销行的含义与两边相同的 malloc 设置
    assert "process rows:" in smoke["printed"] and "same settings" in smoke["printed"]


def _table_lines(printed):
    """比值表的各行（表头 "row unit ..." 之后、JSON 之前），每行拆成各列。"""
    lines = [line.split() for line in printed.splitlines()]
    headers = [i for i, cols in enumerate(lines) if cols[:2] == ["row", "unit"]]
    assert len(headers) == 1, f"exactly one ratio table should be printed:\n{printed}"
    return [cols for cols in lines[headers[0] + 1:] if cols and not cols[0].startswith("{")]


def _table_line(printed, name):
    """表中第一列为 name 的那一行。"""
    lines = [cols for cols in _table_lines(printed) if cols[0] == name]
    assert len(lines) == 1, f"row {name!r} should be printed exactly once:\n{printed}"
    return lines[0]


def test_printed_table_carries_every_row(smoke, bench_modules):
    parse = bench_modules("_bench_common").parse_number
    assert [cols[0] for cols in _table_lines(smoke["printed"])] == smoke["spec"]["rows"]
    for r in smoke["result"]["rows"]:
        name, unit, ours, reference, ratio = _table_line(smoke["printed"], r["name"])
        assert unit == r["unit"]
        assert parse(ours) == pytest.approx(r["ours"], rel=1e-3, abs=1.0)
        if r["reference"] is None:
            assert reference == ratio == "-"
            continue
        assert parse(reference) == pytest.approx(r["reference"], rel=1e-3, abs=1.0)
        if r["ratio"] is None:  # 进程开销行：有参照、无比值
            assert ratio == "-"
            continue
        assert ratio.endswith("x")
        # 打印的比值等于打印的两边之比（4 位有效数字的取整误差之内），也等于返回的比值。
        assert parse(ratio) == pytest.approx(parse(ours) / parse(reference), rel=3e-3)
        assert parse(ratio) == pytest.approx(r["ratio"], rel=1e-3)


def test_printed_json_is_the_returned_record(smoke):
    last = smoke["printed"].strip().splitlines()[-1]
    if smoke["name"] not in PRINTS_JSON:  # bench_data 只打印表：最后一行是表的最后一行
        assert last.split()[0] == smoke["spec"]["rows"][-1]
        return
    record = {k: v for k, v in smoke["result"].items() if k != "rows"}
    assert json.loads(last) == record


def _by_name(result):
    return {r["name"]: r for r in result["rows"]}


def _close_to_rounded(shown, exact, digits):
    """JSON 里取整后的数与未取整的值一致（差不超过半个末位）。"""
    return abs(shown - exact) <= 0.5 * 10.0**-digits + 1e-12


# ---------------------------------------------------------------- 各脚本自己的断言
def test_forward_json_matches_rows_and_compile_happened(smoke_run):
    run = smoke_run("bench_forward")
    record, rows = run["result"], _by_name(run["result"])
    assert run["graphs"] >= 1  # 编译变体真的经过 dynamo，而不是悄悄退回 eager
    for name, key in (("eager", "eager_vs_hf"), ("eager_nocheck", "eager_nocheck_vs_hf"), ("compiled", "compiled_vs_hf")):
        assert _close_to_rounded(record[key], rows[name]["ratio"], 3), name
        assert _close_to_rounded(record["tokens_per_s"]["ours_" + name], rows[name]["ours"], 1), name
        assert _close_to_rounded(record["tokens_per_s"]["hf"], rows[name]["reference"], 1), name
    for name, key in (("eager", "ours_eager"), ("eager_nocheck", "ours_eager_nocheck"), ("compiled", "ours_compiled")):
        assert _close_to_rounded(record["sys_pct_user"][key], rows[name + "_sys"]["ours"], 2), name
        assert _close_to_rounded(record["faults_per_step"][key], rows[name + "_faults"]["ours"], 1), name
        assert _close_to_rounded(record["faults_per_step"]["hf"], rows[name + "_faults"]["reference"], 1), name
    assert (record["preset"], record["batch"], record["seq"]) == ("smoke", 2, 16)


def test_forward_reports_the_measured_check_overhead(smoke_run):
    run = smoke_run("bench_forward")
    record = run["result"]
    # 直接测量：--check-rounds 对交替计时（冒烟为 2 对），中位数比值减 1；旧的固定开销估计已经去掉
    assert record["check_pairs"] == 2
    assert math.isfinite(record["check_overhead"]) and record["check_overhead"] > -1.0
    median_ratio = record["check_overhead"] + 1.0  # 三者都取了 4 位小数：比较时留出取整的余量
    assert 0 < record["check_pair_ratio_min"] <= median_ratio + 1e-4
    assert median_ratio <= record["check_pair_ratio_max"] + 1e-4
    assert not any(key.startswith("check_fixed") or key == "check_overhead_estimate" for key in record)
    assert "shape-check overhead" in run["printed"]


def test_loss_both_sides_compute_the_same_loss(smoke_run):
    run = smoke_run("bench_loss")
    record, rows = run["result"], _by_name(run["result"])
    assert record["chunk_size"] < record["tokens"]  # 分块版真的分了块
    assert record["loss_rel_diff"] < 1e-6
    for key in ("grad_weight_norm_rel_diff", "grad_hidden_norm_rel_diff", "grad_sample_rel_diff",
                "grad_hidden_sample_rel_diff"):
        assert record[key] < 1e-5, key
    for side in ("plain", "chunked"):
        assert record[side]["peak_rss_mib"] >= record[side]["setup_rss_mib"] > 0
    assert _close_to_rounded(record["chunked"]["faults_per_step"], rows["fwd_bwd_faults"]["ours"], 1)
    assert _close_to_rounded(record["plain"]["faults_per_step"], rows["fwd_bwd_faults"]["reference"], 1)
    assert _close_to_rounded(record["memory_ratio"], rows["peak_rss"]["ratio"], 4)
    assert _close_to_rounded(record["time_ratio"], rows["fwd_bwd_time"]["ratio"], 4)


def _every_worker_trained(results, bench_modules):
    """子进程变体都跑完了冒烟的 2 步（损失有限且为正），报告了自己计时那 1 步（首步预热不计）的进程开销，
    并与父进程同样调过 malloc。"""
    tuned = bench_modules("_bench_common").MALLOC_TUNED
    for variant, res in results.items():
        assert "error" not in res, f"{variant}: {res.get('error')}\n{res.get('stderr_tail')}"
        assert len(res["losses"]) == 2 and all(math.isfinite(x) and x > 0 for x in res["losses"]), variant
        assert res["usage"]["steps"] == 1 and res["usage"]["minflt"] >= 0, variant
        assert res["malloc_tuned"] == tuned, variant


def test_train_every_variant_trains(smoke_run, bench_modules):
    run = smoke_run("bench_train")
    record, rows = run["result"], _by_name(run["result"])
    results = record["results"]
    _every_worker_trained(results, bench_modules)
    # 编译变体真的编译了，eager 变体没有
    assert results["ours"]["compiled_graphs"] == results["baseline"]["compiled_graphs"] == 0
    assert results["ours_compile"]["compiled_graphs"] >= 1 and results["ours_teacher_bf16"]["compiled_graphs"] >= 1
    # 同一组初始权重与批：编译与否第一步的损失一致，bf16 教师只差舍入
    first = results["ours"]["losses"][0]
    assert results["ours_compile"]["losses"][0] == pytest.approx(first, rel=1e-4)
    assert results["ours_teacher_bf16"]["losses"][0] == pytest.approx(first, rel=1e-2)
    for name in ("ours", "ours_compile", "ours_teacher_bf16"):
        assert _close_to_rounded(record[name]["speed_ratio"], rows[name]["ratio"], 3), name
        assert _close_to_rounded(record[name]["memory_ratio"], rows[name + "_peak_rss"]["ratio"], 3), name


def test_generate_every_variant_generates_every_token(smoke_run):
    run = smoke_run("bench_generate")
    record, rows = run["result"], _by_name(run["result"])
    batch = record["results"]["batch_1"]
    assert batch["new_tokens_out"] == {"hf": 8, "eager": 8, "compiled": 8}  # tok/s 的分子名副其实
    assert run["graphs"] >= 1
    assert _close_to_rounded(batch["eager_vs_hf"], rows["b1_eager"]["ratio"], 3)
    assert _close_to_rounded(batch["compiled_vs_hf"], rows["b1_compiled"]["ratio"], 3)
    assert _close_to_rounded(batch["compiled_tok_s"], rows["b1_compiled"]["ours"], 2)
    assert _close_to_rounded(batch["hf_tok_s"], rows["b1_compiled"]["reference"], 2)


def test_data_smoke_sizes_reach_the_result(smoke_run):
    record = smoke_run("bench_data")["result"]
    assert (record["repeat"], record["seq_len"], record["batch_size"]) == (1, 64, 4)


def test_cache_both_steps_train_on_the_same_targets(smoke_run, bench_modules):
    run = smoke_run("bench_cache")
    record, rows = run["result"], _by_name(run["result"])
    results = record["results"]
    _every_worker_trained(results, bench_modules)
    # 缓存的目标与在线 top-k 逐位相同（同一个教师、同样的批划分、同样的 float16 取整）：首步损失一致
    assert record["step_from_cache"]["first_loss_rel_diff"] < 1e-6
    # 分片文件每个位置 K 个 int32 id、K 个 float16 log 概率、1 个 float32 尾部质量
    for k in (4, 8):
        assert rows[f"bytes_per_token_k{k}"]["ours"] == 6 * k + 4
    assert _close_to_rounded(record["build"]["ratio"], rows["build"]["ratio"], 3)
    assert _close_to_rounded(record["step_from_cache"]["speed_ratio"], rows["step_from_cache"]["ratio"], 3)
    assert _close_to_rounded(record["step_from_cache"]["memory_ratio"], rows["step_from_cache_peak_rss"]["ratio"], 3)
    assert (record["batch"], record["seq"], record["top_k"]) == (2, 16, 8)


def test_on_policy_both_sides_grade_the_same_step(smoke_run):
    run = smoke_run("bench_on_policy")
    record, rows = run["result"], _by_name(run["result"])
    assert run["graphs"] >= 1  # 本项目的解码步真的编译了
    # 不设 EOS：两边每步都恰好生成 N 个 token（预热与计时各步）
    assert record["warmup_new_tokens"] == 8
    assert record["new_tokens_out"] == {"ours": [8], "reference": [8]}
    # 预热时两边在同一批序列、同一组初始权重上打分：反向 KL 一致（只差 float32 的舍入）
    assert record["warmup_loss_rel_diff"] < 1e-4
    for side in ("ours", "reference"):
        assert len(record["losses"][side]) == 1 and all(math.isfinite(x) and x > 0 for x in record["losses"][side])
    # 各段之和就是整步；JSON 的加速比是表中比值的倒数
    for side, column in (("ours", "ours"), ("reference", "reference")):
        parts = sum(rows[k][column] for k in ("generate_s", "teacher_s", "student_loss_s"))
        assert parts == pytest.approx(rows["step_s"][column], rel=1e-6)
    for name in ("generate_s", "teacher_s", "student_loss_s", "step_s"):
        assert _close_to_rounded(record["speedup"][name], 1.0 / rows[name]["ratio"], 3), name
    assert record["target_met"] == (record["speedup"]["step_s"] >= 2.0)


# ---------------------------------------------------------------- 参数：--smoke 只换缺省值
FULL_DEFAULTS = {
    "bench_forward": dict(preset="student-123m", batch=2, seq=128, rounds=5, warmup=2, check_rounds=10),
    "bench_loss": dict(batch=8, seq=512, vocab=151936, real_vocab=151665, hidden=512, teacher_hidden=896,
                       chunk_size=256, repeats=2, rounds=2),
    "bench_train": dict(batch=4, seq=512, steps=3, teacher_layers=None, teacher_shape="0.5b",  # 0.5b 形状：24 层
                        student="student-123m", real_vocab=151665, chunk_size=256, device="cpu", bf16=False),
    "bench_generate": dict(preset="student-123m", batches="1,8", new_tokens=128, prompt_len=16, repeats=2),
    "bench_attention": dict(preset="student-123m", batch=8, seq=512, doc_lengths="64,256", rounds=5, warmup=2),
    "bench_data": dict(repeat=8, workers=2, seq_len=512, batch_size=8, max_batches=400, student_step=False,
                       student_preset="student-123m"),
    "bench_cache": dict(batch=4, seq=512, steps=3, teacher_layers=None, student="student-123m", real_vocab=151665,
                        top_ks="16,64,256", top_k=64, temperature=2.0,
                        build_blocks=16, chunk_size=256),  # build_blocks 缺省为 batch × 4
    "bench_on_policy": dict(batch=8, prompt=64, new_tokens=64, student="student-123m", teacher="qwen2.5-0.5b",
                            steps=2, real_vocab=151665, device="cpu"),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_smoke_only_changes_defaults(bench_modules, name):
    module = bench_modules(name)
    full = vars(module.parse_args([]))
    assert {k: full[k] for k in FULL_DEFAULTS[name]} == FULL_DEFAULTS[name]  # 完整模式的尺寸不变
    smoke = vars(module.parse_args(["--smoke"]))
    assert {k: smoke[k] for k in module.SMOKE} == module.SMOKE
    assert set(module.SMOKE) <= set(FULL_DEFAULTS[name])  # smoke 改的每个参数都在上面核对过完整值
    key = next(k for k, v in module.SMOKE.items() if isinstance(v, int) and not isinstance(v, bool))
    flag = "--" + key.replace("_", "-")
    assert getattr(module.parse_args(["--smoke", flag, "3"]), key) == 3  # 显式参数优先于 smoke 缺省值
