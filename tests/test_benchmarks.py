"""基准脚本不会悄悄失效：每个脚本的 ``--smoke``（同一条代码路径、极小尺寸）在测试里真的跑一遍，
并核对它交出的数值与打印的比值表。

八个脚本都在本进程里通过 ``main(argv)`` 运行：返回值就是数据，不必解析输出；``bench_loss``、
``bench_train`` 与 ``bench_cache`` 的父进程照常为每个变体另起子进程（峰值内存取子进程自己的 max RSS，这是脚本的设计）。
本进程里被脚本改动的全局状态由 ``_run`` 复原：torch 线程数（bench_forward 会设置）与 dynamo 的编译缓存
（bench_forward、bench_generate、bench_on_policy 会编译）。每个脚本只跑一次（模块级夹具 ``smoke_run`` 记下结果），
所有测试都只读这份结果。不断言耗时。

每次冒烟运行都带 ``--out``：结果文件（机器记录、命令行、记录与各行）写到本模块的临时目录，
test_result_file_holds_the_run 逐个核对。bench_trl 不在这里运行（它需要 TRL，测试环境不装），它的纯函数见
test_bench_trl.py。

进程开销行（单位 %user 与 faults/step，行名以 ``_sys``、``_faults`` 结尾）紧跟在各变体的吞吐行之后：
冒烟尺寸下它们可能为 0，只要求有限、非负，有参照（同一次运行里测得的参照实现）而没有比值。

冒烟运行的耗时主要是编译：bench_train 的两个编译变体各在新进程里重新追踪、编译（inductor 的磁盘缓存在
第二次起命中），bench_forward、bench_generate、bench_on_policy（解码步）各编译一次；其余几秒钟。
"""

import argparse
import contextlib
import datetime
import importlib
import io
import json
import math
import os
import shlex
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
    "bench_generate": dict(argv=[], rows=_with_usage("b1_eager", "b1_compiled", "b1_compiled_vs_static")),
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
    "bench_moe": dict(argv=["--threads", "{threads}"], rows=_with_usage("eager", "compiled")),
    "bench_cross_tokenizer": dict(argv=["--threads", "{threads}"], rows=["align", "step", "step_sys", "step_faults"],
                                  ratio_rows=["step"]),  # 对齐的吞吐没有参照
    "bench_on_policy": dict(
        argv=["--threads", "{threads}"],
        rows=["generate_s", "teacher_s", "student_loss_s", "step_s", "step_sys", "step_faults"],
    ),
}
# 打印 JSON 的脚本：最后一行就是返回值去掉 "rows"。
PRINTS_JSON = ("bench_forward", "bench_loss", "bench_train", "bench_generate", "bench_attention", "bench_cache",
               "bench_on_policy", "bench_moe", "bench_cross_tokenizer")


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


def _smoke(bench_modules, name, out_dir):
    """冒烟运行，带 --out：结果文件写到 out_dir/<脚本>.json（test_result_file_* 读它）。"""
    spec = SCRIPTS[name]
    out = out_dir / f"{name}.json"
    argv = ["--smoke", *[a.format(threads=torch.get_num_threads()) for a in spec["argv"]], "--out", str(out)]
    result, printed, graphs = _run(bench_modules(name), argv)
    return dict(name=name, spec=spec, result=result, printed=printed, graphs=graphs, argv=argv, out=out)


@pytest.fixture(scope="module")
def smoke_run(bench_modules, tmp_path_factory):
    """按名字取某个脚本的冒烟结果；每个脚本只跑一次（失败也只跑一次，之后原样抛出）。"""
    cache, out_dir = {}, tmp_path_factory.mktemp("bench_results")

    def get(name):
        if name not in cache:
            try:
                cache[name] = _smoke(bench_modules, name, out_dir)
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


# ---------------------------------------------------------------- 结果文件（--out）
MACHINE_FIELDS = ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "load_before", "load_after", "torch",
                  "transformers", "python", "platform", "malloc_tuned", "cuda_device", "date")


def test_result_file_holds_the_run(smoke):
    # --out 写出的文件：能解析，机器记录齐全，行与记录就是 main 返回的，命令行能重现这次运行
    saved = json.loads(smoke["out"].read_text(encoding="utf-8"))
    assert set(saved) == {"benchmark", "command", "machine", "record", "rows"}
    assert saved["benchmark"] == smoke["name"]
    assert saved["rows"] == json.loads(json.dumps(smoke["result"]["rows"]))
    assert saved["record"] == json.loads(json.dumps({k: v for k, v in smoke["result"].items() if k != "rows"}))
    machine = saved["machine"]
    assert set(MACHINE_FIELDS) <= set(machine)
    assert machine["torch"] == torch.__version__ and machine["logical_cores"] == os.cpu_count()
    assert machine["torch_threads"] >= 1 and machine["cpu_model"]
    for key in ("load_before", "load_after"):
        assert len(machine[key]) == 3 and all(x >= 0 for x in machine[key]), key
    assert datetime.datetime.fromisoformat(machine["date"]).tzinfo is not None
    assert shlex.split(saved["command"]) == ["python", f"benchmarks/{smoke['name']}.py", *smoke["argv"]]


def test_out_refuses_an_existing_file(bench_modules, tmp_path, capsys):
    # 已有的结果文件不覆盖：解析参数时就报错（argparse 的一段话，退出码 2），文件原样
    old = tmp_path / "old.json"
    old.write_text("keep me", encoding="utf-8")
    with pytest.raises(SystemExit) as err:
        bench_modules("bench_generate").parse_args(["--smoke", "--out", str(old)])
    assert err.value.code == 2 and "already exists" in capsys.readouterr().err
    assert old.read_text(encoding="utf-8") == "keep me"


def test_write_result_never_overwrites(bench_modules, tmp_path):
    # 运行期间才出现的同名文件也不会被覆盖（os.link 只在目标不存在时创建），临时文件不留下
    common = bench_modules("_bench_common")
    target = tmp_path / "sub" / "r.json"
    args = argparse.Namespace(out=str(target), load_before=[0.0, 0.0, 0.0])
    assert common.write_result(args, "bench_x.py", ["--a"], {"k": 1}, []) == target
    assert json.loads(target.read_text(encoding="utf-8"))["record"] == {"k": 1}
    target.write_text("appeared", encoding="utf-8")
    with pytest.raises(SystemExit, match="left as it was"):
        common.write_result(args, "bench_x.py", ["--a"], {"k": 2}, [])
    assert target.read_text(encoding="utf-8") == "appeared"
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]
    assert common.write_result(argparse.Namespace(out=None), "bench_x.py", [], {}, []) is None


def test_cpu_model_reads_model_name(bench_modules, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU 9000\n\nprocessor\t: 1\n"
                       "model name\t: Other\n", encoding="utf-8")
    assert bench_modules("_bench_common").cpu_model(str(cpuinfo)) == "Test CPU 9000"


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
    for name in ("ours", "baseline", "baseline_teacher_bf16"):
        assert results[name]["compiled_graphs"] == 0, name
    assert results["ours_compile"]["compiled_graphs"] >= 1 and results["ours_teacher_bf16"]["compiled_graphs"] >= 1
    # 两边同一组初始权重与批：每对（变体, 它的参照）第一步的损失一致——float32 只差舍入，bf16 教师的一对也
    # 只差两边 bf16 logits 的舍入（两边教师的精度相同）
    pairs = {"ours": "baseline", "ours_compile": "baseline", "ours_teacher_bf16": "baseline_teacher_bf16"}
    for name, ref in pairs.items():
        assert results[name]["losses"][0] == pytest.approx(results[ref]["losses"][0], rel=1e-3 if "bf16" in name else 1e-5)
        mine, theirs = results[name]["losses"][0], results[ref]["losses"][0]
        assert record["first_loss_rel_diff"][name] == pytest.approx(abs(mine - theirs) / abs(theirs), abs=1e-12)
        # 表中这一行的参照正是它的参照（bf16 教师对 bf16 教师）
        assert rows[name]["reference"] == pytest.approx(record["batch"] * record["seq"] / results[ref]["step_s"])
        assert rows[name + "_peak_rss"]["reference"] == results[ref]["peak_rss_mib"]
        assert record[name]["reference"] == ref
        assert _close_to_rounded(record[name]["speed_ratio"], rows[name]["ratio"], 3), name
        assert _close_to_rounded(record[name]["memory_ratio"], rows[name + "_peak_rss"]["ratio"], 3), name


def test_train_bf16_mode_needs_no_second_baseline(bench_modules):
    # --bf16（GPU 检查）时两边的教师都已是 bf16：每个变体的参照都是 baseline；平时 bf16 教师一行对 bf16 教师的基线
    module = bench_modules("bench_train")
    assert module.references(True) == {"ours": "baseline", "ours_compile": "baseline", "ours_teacher_bf16": "baseline"}
    assert module.references(False)["ours_teacher_bf16"] == "baseline_teacher_bf16"
    assert module.references(False)["ours"] == module.references(False)["ours_compile"] == "baseline"



def test_train_rows_chooses_variants_and_a_failed_reference_drops_only_its_pairs(bench_modules):
    # --rows 只跑所选变体及其参照；参照被杀掉（OOM 时 exit -9）时，其余的对照样写出比值行
    module = bench_modules("bench_train")
    assert module.references(False, "ours_teacher_bf16") == {"ours_teacher_bf16": "baseline_teacher_bf16"}
    with pytest.raises(SystemExit, match="--rows 'ours,nope'"):
        module.references(False, "ours,nope")
    ok = {"step_s": 1.0, "peak_rss_mib": 1.0}
    results = {"ours": ok, "ours_compile": ok, "ours_teacher_bf16": ok, "baseline": ok,
               "baseline_teacher_bf16": {"error": "exit -9"}}
    assert module.completed(results, module.references(False)) == {"ours": "baseline", "ours_compile": "baseline"}

def test_generate_every_variant_generates_every_token(smoke_run):
    run = smoke_run("bench_generate")
    record, rows = run["result"], _by_name(run["result"])
    batch = record["results"]["batch_1"]
    # tok/s 的分子名副其实
    assert batch["new_tokens_out"] == {"hf": 8, "hf_static": 8, "eager": 8, "compiled": 8}
    assert run["graphs"] >= 2
    assert _close_to_rounded(batch["eager_vs_hf"], rows["b1_eager"]["ratio"], 3)
    assert _close_to_rounded(batch["compiled_vs_hf"], rows["b1_compiled"]["ratio"], 3)
    assert _close_to_rounded(batch["compiled_vs_hf_static"], rows["b1_compiled_vs_static"]["ratio"], 3)
    assert _close_to_rounded(batch["compiled_tok_s"], rows["b1_compiled"]["ours"], 2)
    assert _close_to_rounded(batch["hf_tok_s"], rows["b1_compiled"]["reference"], 2)
    assert _close_to_rounded(batch["hf_static_tok_s"], rows["b1_compiled_vs_static"]["reference"], 2)


def test_generate_static_reference_compiles_once_and_agrees(smoke_run):
    # transformers 的静态缓存 + torch.compile 真的编译了（prefill 与解码步），计时的各轮里两边都没有再编译
    batch = smoke_run("bench_generate")["result"]["results"]["batch_1"]
    assert batch["graphs_in_warmup"]["ours"] >= 1 and batch["graphs_in_warmup"]["hf_static"] >= 1
    assert batch["graphs_while_timed"] == 0
    # 同一组权重的贪心输出：冒烟尺寸下四个变体逐位相同（近似平局的放宽只在大模型上才可能用到）
    for pair, check in batch["token_checks"].items():
        assert check == {"equal": True, "rows_differing": 0, "first_differences": [], "ok": True}, pair


def test_generate_agreement_is_judged_by_the_logit_gap(bench_modules):
    # 一个 token 被换成次优候选：logit 差（由前向独立算出）在容差内算近似平局，超出就不算
    module = bench_modules("bench_generate")
    from functional_lm import ModelConfig, forward, init_params

    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      vocab_size=64, max_seq_len=32)
    params = init_params(cfg, seed=3)
    reference = torch.tensor([[5, 9, 2, 7, 7, 1]])
    with torch.no_grad():
        logits = forward(params, reference[:, :4], cfg)[0, -1]
    top2 = torch.topk(logits, 2)
    reference[0, 4] = top2.indices[0]
    swapped = reference.clone()
    swapped[0, 4] = top2.indices[1]
    gap = float(top2.values[0] - top2.values[1])
    tie = module.greedy_agreement(swapped, reference, params, cfg, 2, tolerance=gap * 1.01)
    assert tie["equal"] is False and tie["ok"] is True and tie["rows_differing"] == 1
    assert tie["first_differences"][0][:2] == [0, 4]
    assert tie["first_differences"][0][2] == pytest.approx(gap, rel=1e-5)
    assert module.greedy_agreement(swapped, reference, params, cfg, 2, tolerance=gap * 0.5)["ok"] is False
    assert module.greedy_agreement(reference, reference, params, cfg, 2, tolerance=0.0)["equal"] is True


def test_generate_sanity_check_refuses_disagreeing_sides(bench_modules):
    check = bench_modules("bench_generate").check_sanity
    good = {"equal": True, "rows_differing": 0, "first_differences": [], "ok": True}
    result = {"token_checks": {"compiled_vs_hf_static": good}, "graphs_while_timed": 0,
              "graphs_in_warmup": {"ours": 1, "hf_static": 2}}
    check({"batch_1": result})  # 一致：不报错
    bad = dict(result, token_checks={"compiled_vs_hf_static": dict(good, equal=False, ok=False,
                                                                     first_differences=[[0, 5, 0.3]])})
    with pytest.raises(SystemExit, match="compiled_vs_hf_static"):
        check({"batch_1": bad})
    with pytest.raises(SystemExit, match="during the timed rounds"):
        check({"batch_1": dict(result, graphs_while_timed=1)})
    with pytest.raises(SystemExit, match="not compiled"):
        check({"batch_1": dict(result, graphs_in_warmup={"ours": 1, "hf_static": 0})})


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
    assert record["teacher_projection_phase"] == "student_loss_s"


def test_on_policy_reference_teacher_phase_stops_before_the_projection(bench_modules):
    # 参照的 teacher 段只跑主干（返回隐藏状态 (b, t, d)，不是 logits），输出投影在 student_loss 段——与本项目一侧相同
    module = bench_modules("bench_on_policy")
    args = module.parse_args(["--smoke"])
    from functional_lm import ModelConfig, init_params

    scfg, tcfg = bench_modules("_bench_common").model_config(args.student), ModelConfig(**module.TEACHERS[args.teacher])
    side = module.reference_side(args, init_params(scfg, seed=0), init_params(tcfg, seed=1))
    seq = torch.randint(0, args.real_vocab, (args.batch, args.prompt + args.new_tokens))
    hidden = side.teacher(seq)
    assert hidden.shape == (args.batch, seq.shape[1], tcfg.hidden_size)
    from functional_lm.models.decoder import forward_hidden

    expected = forward_hidden(init_params(tcfg, seed=1), seq, tcfg)
    torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4)


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
    "bench_moe": dict(family="qwen3_moe", batch=4, seq=128, rounds=7, warmup=2),
    "bench_on_policy": dict(batch=8, prompt=64, new_tokens=64, student="student-123m", teacher="qwen2.5-0.5b",
                            steps=3, real_vocab=151665, device="cpu"),  # docs/benchmarks.md：3 步中位数
    "bench_cross_tokenizer": dict(batch=4, seq=512, student="student-123m", teacher="qwen2.5-0.5b", steps=2,
                                  align_repeats=3),
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
