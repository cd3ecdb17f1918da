"""蒸馏损失的测试：散度公式（float64 直接求值）、约定（T²、归一化、掩码、填充词表列）、
稀疏教师目标、分块损失与普通实现在数值和梯度上一致。

约定：P 是教师分布，Q 是学生分布，均在温度 T 下、只在真实词表列上取 softmax。
所有尺寸都很小（词表 40–300、几十个 token），整个文件应在数秒内跑完。
"""

import math

import pytest
import torch
import torch.nn.functional as F

import functional_lm.losses.chunked as chunked_engine
import functional_lm.losses.divergences as dense_divergences
from functional_lm.losses import (
    DIVERGENCES,
    chunked_distillation_loss,
    distillation_loss,
    sparse_distillation_loss,
    teacher_topk,
    temperature_log_softmax,
    token_divergence,
)

# ----------------------------------------------------------------------------------------------
# 参考实现：直接在概率空间里按公式计算（float64），与被测代码的 log 空间写法相互独立。
# ----------------------------------------------------------------------------------------------


def ref_probs(logits, temperature, real_vocab=None):
    """真实词表上的 softmax(z / T)，float64。"""
    v = logits.shape[-1] if real_vocab is None else real_vocab
    return torch.softmax(logits[..., :v].double() / temperature, dim=-1)


def ref_kl(p, q):
    """KL(p‖q) = Σ p·log(p/q)。"""
    return (p * torch.log(p / q)).sum(-1)


def ref_divergence(name, p, q, beta=0.5, skew_lambda=0.1, kl=None):
    """按文档中的公式逐条求值：p = 教师，q = 学生；kl 缺省为 ref_kl（概率里有 0 时传 zero_safe_kl）。"""
    kl = ref_kl if kl is None else kl
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, skew_lambda * p + (1 - skew_lambda) * q)
    if name == "skew_reverse_kl":
        return kl(q, skew_lambda * q + (1 - skew_lambda) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def zero_safe_kl(p, q):
    """KL(p‖q) = Σ [xlogy(p, p) − xlogy(p, q)]：p = 0 的项按 0·log 0 = 0 取 0，p > 0 而 q = 0 时为 +∞。"""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def ref_loss(s, t, labels, *, alpha, temperature, divergence, real_vocab=None, mask=None, num_tokens=None):
    """规格书的目标函数：α·T²·mean(D) + (1−α)·mean(CE)，在有效 token 上取平均。"""
    valid = labels != -100
    if mask is not None:
        valid = valid & mask
    p = ref_probs(t, temperature, real_vocab)
    q = ref_probs(s, temperature, real_vocab)
    kd = ref_divergence(divergence, p, q)
    q1 = ref_probs(s, 1.0, real_vocab)
    ce = -torch.log(q1.gather(-1, labels.clamp(min=0)[..., None])[..., 0])
    n = valid.sum() if num_tokens is None else num_tokens
    kd_mean = torch.where(valid, kd, 0).sum() / n
    ce_mean = torch.where(valid, ce, 0).sum() / n
    return alpha * temperature**2 * kd_mean + (1 - alpha) * ce_mean


def make_logits(*shape, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def make_labels(b, t, v, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed + 1000)
    labels = torch.randint(0, v, (b, t), generator=g)
    drop = torch.rand(b, t, generator=g) < ignore_frac
    labels[drop] = -100
    labels[0, 0] = 1  # 保证至少一个有效 token
    return labels


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------
# 散度族
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_divergence_matches_float64_formula(name, temperature):
    s, t = make_logits(3, 5, 37, seed=1), make_logits(3, 5, 37, seed=2)
    got = token_divergence(s, t, divergence=name, temperature=temperature, beta=0.3, skew_lambda=0.2)
    p, q = ref_probs(t, temperature), ref_probs(s, temperature)
    want = ref_divergence(name, p, q, beta=0.3, skew_lambda=0.2)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_zero_iff_equal_and_nonnegative(name):
    s = make_logits(4, 6, 50, seed=3)
    same = token_divergence(s, s.clone(), divergence=name)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-12, rtol=0)
    for seed in range(5):
        t = make_logits(4, 6, 50, seed=10 + seed)
        d = token_divergence(s, t, divergence=name)
        assert (d > 0).all(), f"{name} must be strictly positive for different distributions"


def test_divergence_float32_matches_float64():
    s, t = make_logits(4, 8, 200, seed=4), make_logits(4, 8, 200, seed=5)
    for name in DIVERGENCES:
        d32 = token_divergence(s.float(), t.float(), divergence=name)
        d64 = token_divergence(s, t, divergence=name)
        assert d32.dtype == torch.float32
        torch.testing.assert_close(d32.double(), d64, rtol=1e-4, atol=1e-5)


def test_jsd_beta_limits_are_the_two_kls():
    """约定（Agarwal et al. GKD / TRL）：M = βP + (1−β)Q，JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M)。
    β→0 时 JSD_β/β → KL(P‖Q)（前向），β→1 时 JSD_β/(1−β) → KL(Q‖P)（反向）；
    端点 β=0 与 β=1 直接定义为这两个 KL 本身。"""
    s, t = make_logits(2, 3, 40, seed=6), make_logits(2, 3, 40, seed=7)
    fkl = token_divergence(s, t, divergence="forward_kl")
    rkl = token_divergence(s, t, divergence="reverse_kl")
    torch.testing.assert_close(token_divergence(s, t, divergence="jsd", beta=0.0), fkl)
    torch.testing.assert_close(token_divergence(s, t, divergence="jsd", beta=1.0), rkl)
    eps = 1e-6
    near0 = token_divergence(s, t, divergence="jsd", beta=eps) / eps
    near1 = token_divergence(s, t, divergence="jsd", beta=1 - eps) / eps
    torch.testing.assert_close(near0, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(near1, rkl, rtol=1e-4, atol=0)
    # β = 1/2 是对称的经典 JSD：交换师生不变，且不超过 log 2。
    sym = token_divergence(s, t, divergence="jsd", beta=0.5)
    torch.testing.assert_close(sym, token_divergence(t, s, divergence="jsd", beta=0.5))
    assert (sym <= math.log(2)).all()


@pytest.mark.parametrize("skew,plain", [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_skew_lambda_to_zero_recovers_kl(skew, plain):
    s, t = make_logits(2, 3, 40, seed=8), make_logits(2, 3, 40, seed=9)
    kl = token_divergence(s, t, divergence=plain)
    torch.testing.assert_close(token_divergence(s, t, divergence=skew, skew_lambda=0.0), kl)
    errs = [
        (token_divergence(s, t, divergence=skew, skew_lambda=lam) - kl).abs().max().item()
        for lam in (1e-1, 1e-2, 1e-3, 1e-6)
    ]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 1e-4 * kl.max().item()


def test_temperature_log_softmax_padded_columns_are_zero_probability():
    logits = make_logits(2, 3, 30, seed=11)
    logits[..., 25:] = 50.0  # 若不排除，填充列会吸走几乎全部概率
    logp = temperature_log_softmax(logits, temperature=2.0, real_vocab_size=25)
    assert logp.shape == logits.shape
    probs = logp.exp()
    assert (probs[..., 25:] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(probs[..., :25], ref_probs(logits, 2.0, 25))


# ----------------------------------------------------------------------------------------------
# 完整目标函数的约定
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES)
def test_distillation_loss_matches_reference_objective(name):
    s, t = make_logits(2, 7, 45, seed=12), make_logits(2, 7, 45, seed=13)
    labels = make_labels(2, 7, 45, seed=12)
    got = distillation_loss(s, t, labels, divergence=name)  # 默认 α = 0.5，T = 2
    want = ref_loss(s, t, labels, alpha=0.5, temperature=2.0, divergence=name)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_defaults_and_parts_apply_t_squared_exactly_once():
    s, t = make_logits(2, 6, 33, seed=14), make_logits(2, 6, 33, seed=15)
    labels = make_labels(2, 6, 33, seed=14)
    loss, parts = distillation_loss(s, t, labels, return_parts=True)
    assert set(parts) == {"kd", "ce"}
    # kd 与 ce 是未加权的平均散度与平均交叉熵；T² 只乘一次，且只乘在 kd 上。
    torch.testing.assert_close(loss, 0.5 * 4.0 * parts["kd"] + 0.5 * parts["ce"])
    valid = labels != -100
    kd_ref = ref_kl(ref_probs(t, 2.0), ref_probs(s, 2.0))[valid].mean()
    ce_ref = F.cross_entropy(s[valid], labels[valid])
    torch.testing.assert_close(parts["kd"], kd_ref)
    torch.testing.assert_close(parts["ce"], ce_ref)
    # α = 1 只剩 T²·KD，α = 0 只剩 CE（交叉熵在 T = 1，与温度无关）。
    torch.testing.assert_close(distillation_loss(s, t, labels, alpha=1.0), 4.0 * kd_ref)
    torch.testing.assert_close(distillation_loss(s, t, labels, alpha=0.0, temperature=5.0), ce_ref)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_forward_kl_gradient_is_analytic(alpha):
    """∂loss/∂s = α·T²·(softmax(s/T) − softmax(t/T))/T / N + (1−α)·(softmax(s) − onehot)/N（有效 token）。"""
    temperature = 2.0
    s, t = make_logits(2, 5, 31, seed=16), make_logits(2, 5, 31, seed=17)
    labels = make_labels(2, 5, 31, seed=16)
    valid = (labels != -100)[..., None]
    n = valid.sum()

    def loss_fn(student_logits):
        return distillation_loss(student_logits, t, labels, alpha=alpha, temperature=temperature)

    grad = torch.func.grad(loss_fn)(s)
    q_t, p_t = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    onehot = F.one_hot(labels.clamp(min=0), 31).double()
    analytic = alpha * temperature**2 * (q_t - p_t) / temperature + (1 - alpha) * (torch.softmax(s, -1) - onehot)
    analytic = torch.where(valid, analytic, 0) / n
    torch.testing.assert_close(grad, analytic, rtol=1e-10, atol=1e-13)


def test_gradient_accumulation_with_global_token_count_equals_full_batch():
    torch.manual_seed(0)
    s = make_logits(8, 6, 40, seed=18).requires_grad_()
    t = make_logits(8, 6, 40, seed=19)
    labels = make_labels(8, 6, 40, seed=18, ignore_frac=0.5)
    labels[:2, :] = -100  # 让各微批的有效 token 数明显不同
    labels[0, 0] = 3
    full = distillation_loss(s, t, labels)
    (g_full,) = torch.autograd.grad(full, s)

    total = int((labels != -100).sum())
    acc_loss, g_acc, g_naive = 0.0, torch.zeros_like(s), torch.zeros_like(s)
    for rows in torch.arange(8).chunk(4):
        lm = distillation_loss(s[rows], t[rows], labels[rows], num_tokens=total)
        acc_loss = acc_loss + lm.detach()
        g_acc += torch.autograd.grad(lm, s)[0]
        naive = distillation_loss(s[rows], t[rows], labels[rows]) / 4  # 各自按本微批计数：错误做法
        g_naive += torch.autograd.grad(naive, s)[0]
    torch.testing.assert_close(acc_loss, full.detach())
    torch.testing.assert_close(g_acc, g_full, rtol=1e-12, atol=1e-15)
    assert rel_err(g_naive, g_full) > 1e-2  # 对照：不传全局计数确实会得到不同的梯度
    # 张量形式的计数（例如跨进程 all_reduce 得到的）同样可用。
    as_tensor = distillation_loss(s, t, labels, num_tokens=torch.tensor(total))
    torch.testing.assert_close(as_tensor, full)


def test_ignore_index_and_loss_mask_tokens_contribute_nothing():
    s = make_logits(2, 6, 30, seed=20).requires_grad_()
    t = make_logits(2, 6, 30, seed=21)
    labels = make_labels(2, 6, 30, seed=20)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    base = distillation_loss(s, t, labels, loss_mask=mask)
    (g,) = torch.autograd.grad(base, s)
    excluded = (labels == -100) | ~mask
    assert excluded.any() and (~excluded).any()
    assert (g[excluded] == 0).all()
    # 被排除位置上的 logits 取任何（有限）值，损失都不变。
    s2, t2 = s.detach().clone(), t.clone()
    s2[excluded] = make_logits(int(excluded.sum()), 30, seed=99, scale=20.0)
    t2[excluded] = -s2[excluded]
    torch.testing.assert_close(distillation_loss(s2, t2, labels, loss_mask=mask), base.detach())
    want = ref_loss(s.detach(), t, labels, alpha=0.5, temperature=2.0, divergence="forward_kl", mask=mask)
    torch.testing.assert_close(base.detach(), want)
    # 自定义 ignore_index。
    labels7 = torch.where(labels == -100, torch.full_like(labels, 7777), labels)
    torch.testing.assert_close(
        distillation_loss(s, t, labels7, ignore_index=7777, loss_mask=mask).detach(), base.detach()
    )


def test_no_valid_tokens_gives_zero_not_nan():
    s = make_logits(2, 3, 20, seed=22).requires_grad_()
    t = make_logits(2, 3, 20, seed=23)
    labels = torch.full((2, 3), -100)
    loss = distillation_loss(s, t, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()


def test_padded_vocab_columns_get_zero_probability_and_zero_gradient():
    """学生 40 列、教师 48 列，真实词表 33：两边都只在前 33 列上取 softmax。"""
    real = 33
    s = make_logits(2, 5, 40, seed=24).requires_grad_()
    t = make_logits(2, 5, 48, seed=25)
    labels = make_labels(2, 5, real, seed=24)
    for name in DIVERGENCES:
        loss = distillation_loss(s, t, labels, divergence=name, real_vocab_size=real)
        want = ref_loss(s.detach(), t, labels, alpha=0.5, temperature=2.0, divergence=name, real_vocab=real)
        torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad(loss, s)
        assert (g[..., real:] == 0).all()
        # 填充列取很大的值（若不排除就会占据几乎全部概率），损失不变。
        s_big, t_big = s.detach().clone(), t.clone()
        s_big[..., real:], t_big[..., real:] = 60.0, -60.0
        torch.testing.assert_close(
            distillation_loss(s_big, t_big, labels, divergence=name, real_vocab_size=real), loss.detach()
        )


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_forward_kl", "tvd"])
def test_teacher_minus_inf_columns_are_exact_zeros_not_nan(name):
    """教师把某些 token 禁掉（logit = −∞，P = 0）：0·log 0 项贡献恰为 0，数值与梯度都有限。
    （反向 KL 在 P = 0 而 Q > 0 处数学上就是 +∞，故不在此列。）"""
    s = make_logits(2, 4, 30, seed=35).requires_grad_()
    t = make_logits(2, 4, 30, seed=36)
    t[..., 5:12] = float("-inf")
    labels = make_labels(2, 4, 30, seed=35)
    loss = distillation_loss(s, t, labels, divergence=name)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    p, q = ref_probs(t, 2.0), ref_probs(s.detach(), 2.0)
    safe_p = p.clamp(min=1e-300)  # 参考实现里用 0·log(1e-300/q) = 0 规避 0·log 0
    want = ref_divergence(name, safe_p, q)
    got = token_divergence(s.detach(), t, divergence=name)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_vocab_size_validation():
    s, t = make_logits(1, 2, 40), make_logits(1, 2, 48)
    labels = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="40.*48|48.*40"):
        distillation_loss(s, t, labels)  # 列数不同又没给真实词表大小
    with pytest.raises(ValueError, match="41"):
        distillation_loss(s, t, labels, real_vocab_size=41)  # 学生只有 40 列
    with pytest.raises(ValueError, match="label"):
        distillation_loss(s, t, torch.full((1, 2), 35), real_vocab_size=33)  # 标签落在填充列


def test_argument_validation_messages():
    s, t = make_logits(1, 2, 10), make_logits(1, 2, 10)
    labels = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="forward_kl.*reverse_kl.*jsd.*tvd"):
        distillation_loss(s, t, labels, divergence="kl")
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, labels, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, labels, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(s, t, labels, divergence="jsd", beta=-0.1)
    with pytest.raises(ValueError, match="skew_lambda"):
        distillation_loss(s, t, labels, divergence="skew_forward_kl", skew_lambda=1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        distillation_loss(s, t, labels, num_tokens=-1)
    with pytest.raises(Exception, match="labels|dimension|shape|size"):
        distillation_loss(s, t, torch.zeros(1, 3, dtype=torch.long))  # 形状不符（jaxtyping 报错）


def test_low_precision_logits_are_upcast():
    s, t = make_logits(2, 4, 64, seed=26), make_logits(2, 4, 64, seed=27)
    labels = make_labels(2, 4, 64, seed=26)
    bf = distillation_loss(s.bfloat16(), t.bfloat16(), labels)
    assert bf.dtype == torch.float32
    want = ref_loss(s.bfloat16().double(), t.bfloat16().double(), labels, alpha=0.5, temperature=2.0,
                    divergence="forward_kl")
    torch.testing.assert_close(bf.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 稀疏（top-k）教师目标
# ----------------------------------------------------------------------------------------------


def test_teacher_topk_returns_log_probs_at_temperature_and_tail_mass():
    t = make_logits(2, 3, 50, seed=28)
    ids, logp, tail = teacher_topk(t, 5, temperature=2.0, real_vocab_size=45)
    p = ref_probs(t, 2.0, 45)
    want_p, want_ids = p.topk(5, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logp.exp(), want_p)
    torch.testing.assert_close(tail, 1 - want_p.sum(-1))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_sparse_full_k_equals_dense(name):
    v = 40
    s, t = make_logits(2, 4, v, seed=29), make_logits(2, 4, v, seed=30)
    labels = make_labels(2, 4, v, seed=29)
    ids, logp, tail = teacher_topk(t, v, temperature=2.0)
    dense = distillation_loss(s, t, labels, divergence=name)
    sparse = sparse_distillation_loss(s, ids, logp, labels, teacher_tail_mass=tail, divergence=name)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_sparse_converges_to_dense_as_k_grows(name):
    """稀疏版把非 top-k 的概率并成一个"尾部"桶：按数据处理不等式，它不超过稠密散度，
    且 k 越大（划分越细）越接近，k = V 时相等。"""
    v = 64
    s, t = make_logits(3, 4, v, seed=31), make_logits(3, 4, v, seed=32, scale=4.0)
    labels = make_labels(3, 4, v, seed=31)
    kw = dict(divergence=name, alpha=1.0, temperature=1.5)
    dense = distillation_loss(s, t, labels, **kw)
    gaps = []
    for k in (1, 4, 16, 48, 63, 64):
        ids, logp, tail = teacher_topk(t, k, temperature=1.5)
        sparse = sparse_distillation_loss(s, ids, logp, labels, teacher_tail_mass=tail, **kw)
        assert sparse <= dense + 1e-12
        gaps.append((dense - sparse).item())
    assert all(a >= b - 1e-12 for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 1e-3 and abs(gaps[-1]) < 1e-12


def test_sparse_tail_mass_defaults_to_remainder_and_gradients_flow():
    v = 30
    s = make_logits(2, 3, v, seed=33).requires_grad_()
    t = make_logits(2, 3, v, seed=34)
    labels = make_labels(2, 3, v, seed=33)
    ids, logp, tail = teacher_topk(t, 8, temperature=2.0)
    a = sparse_distillation_loss(s, ids, logp, labels, teacher_tail_mass=tail)
    b = sparse_distillation_loss(s, ids, logp, labels)
    torch.testing.assert_close(a, b)
    (g,) = torch.autograd.grad(b, s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# 分块损失：不物化整批 logits，数值和梯度与普通实现一致
# ----------------------------------------------------------------------------------------------


def chunked_case(seed=40, b=2, t=9, d=16, dt=24, vs=70, vt=76, real=64):
    g = torch.Generator().manual_seed(seed)
    emb = (0.5 * torch.randn(vs, d, generator=g)).requires_grad_()  # 共享的嵌入 / 输出投影
    ids = torch.randint(0, real, (b, t), generator=g)
    proj = torch.randn(d, d, generator=g) / math.sqrt(d)
    th = torch.randn(b, t, dt, generator=g)
    tw = 0.5 * torch.randn(vt, dt, generator=g)
    labels = make_labels(b, t, real, seed=seed)
    return emb, ids, proj, th, tw, labels, real


def student_hidden(emb, ids, proj):
    """一个玩具"学生主干"：嵌入 → 线性 → tanh；让梯度经由隐藏状态和输出投影两路到达嵌入。"""
    return torch.tanh(emb[ids] @ proj)


def plain_reference(emb, ids, proj, th, tw, labels, real, **kw):
    h = student_hidden(emb, ids, proj)
    loss = distillation_loss(F.linear(h, emb), F.linear(th, tw), labels, real_vocab_size=real, **kw)
    return loss, torch.autograd.grad(loss, emb)[0]


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [6, 18, 5, 64])  # 18 = 全部 token；6 整除；5 不整除；64 > token 数
def test_chunked_equals_plain_value_and_gradient(name, chunk_size):
    emb, ids, proj, th, tw, labels, real = chunked_case()
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[1, -2:] = False
    kw = dict(divergence=name, loss_mask=mask, temperature=1.7, alpha=0.4)
    want, g_want = plain_reference(emb, ids, proj, th, tw, labels, real, **kw)
    h = student_hidden(emb, ids, proj)
    got = chunked_distillation_loss(
        h, emb, labels, teacher_hidden=th, teacher_weight=tw, real_vocab_size=real, chunk_size=chunk_size, **kw
    )
    (g_got,) = torch.autograd.grad(got, emb)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(g_got, g_want) <= 1e-5
    assert (g_got[real:] == 0).all()  # 填充行（嵌入的多余行）梯度为零


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 1.0), (3.0, 0.0), (1.0, 0.0)])
def test_chunked_forward_kl_fast_path_edge_hyperparameters(temperature, alpha):
    """前向 KL 走解析梯度的快速路径：T = 1（两个 softmax 重合）与 α 取端点时也要与普通版一致。"""
    emb, ids, proj, th, tw, labels, real = chunked_case(seed=44)
    kw = dict(temperature=temperature, alpha=alpha)
    want, g_want = plain_reference(emb, ids, proj, th, tw, labels, real, **kw)
    h = student_hidden(emb, ids, proj)
    got = chunked_distillation_loss(h, emb, labels, teacher_hidden=th, teacher_weight=tw, real_vocab_size=real,
                                    chunk_size=7, **kw)
    (g_got,) = torch.autograd.grad(got, emb)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(g_got, g_want) <= 1e-5


def test_chunked_teacher_callable_parts_and_hidden_gradient():
    emb, ids, proj, th, tw, labels, real = chunked_case(seed=41)
    flat_teacher = F.linear(th, tw).reshape(-1, tw.shape[0])
    seen = []

    def teacher_fn(rows):
        seen.append((rows.start, rows.stop))
        return flat_teacher[rows]

    h_leaf = student_hidden(emb, ids, proj).detach().requires_grad_()
    got, parts = chunked_distillation_loss(
        h_leaf, emb, labels, teacher_logits_fn=teacher_fn, real_vocab_size=real, chunk_size=4, return_parts=True
    )
    assert seen == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 18)]
    torch.testing.assert_close(flat_teacher, F.linear(th, tw).reshape(-1, tw.shape[0]), rtol=0, atol=0)  # 缓存未被改写
    (3.0 * got).backward()  # 上游梯度不为 1（如损失缩放）也要正确传递
    h_ref = h_leaf.detach().clone().requires_grad_()
    emb_ref = emb.detach().clone().requires_grad_()
    want, want_parts = distillation_loss(
        F.linear(h_ref, emb_ref), F.linear(th, tw), labels, real_vocab_size=real, return_parts=True
    )
    (3.0 * want).backward()
    assert rel_err(got.detach(), want.detach()) <= 1e-5
    for key in ("kd", "ce"):
        assert rel_err(parts[key], want_parts[key]) <= 1e-5
    assert rel_err(h_leaf.grad, h_ref.grad) <= 1e-5
    assert rel_err(emb.grad, emb_ref.grad) <= 1e-5


def test_chunked_gradient_accumulation_and_empty_batch():
    emb, ids, proj, th, tw, labels, real = chunked_case(seed=42, b=4)
    h = student_hidden(emb, ids, proj).detach()
    total = int((labels != -100).sum())
    full = chunked_distillation_loss(h, emb, labels, teacher_hidden=th, teacher_weight=tw, real_vocab_size=real)
    (g_full,) = torch.autograd.grad(full, emb)
    g_acc = torch.zeros_like(emb)
    for rows in torch.arange(4).chunk(2):
        part = chunked_distillation_loss(
            h[rows], emb, labels[rows], teacher_hidden=th[rows], teacher_weight=tw, real_vocab_size=real,
            num_tokens=total, chunk_size=7,
        )
        g_acc += torch.autograd.grad(part, emb)[0]
    assert rel_err(g_acc, g_full) <= 1e-5
    empty = chunked_distillation_loss(
        h, emb, torch.full_like(labels, -100), teacher_hidden=th, teacher_weight=tw, real_vocab_size=real
    )
    assert empty.item() == 0.0
    (g_empty,) = torch.autograd.grad(empty, emb)
    assert (g_empty == 0).all()


def test_chunked_bfloat16_weights():
    """bf16 的隐藏状态与权重：损失在 float32 中计算，∂W 在 float32 中累加后再转回 bf16。"""
    emb, ids, proj, th, tw, labels, real = chunked_case(seed=45)
    h16 = student_hidden(emb, ids, proj).detach().bfloat16().requires_grad_()
    emb16 = emb.detach().bfloat16().requires_grad_()
    th16, tw16 = th.bfloat16(), tw.bfloat16()
    for name in ("forward_kl", "jsd"):  # 快速路径与通用路径各一
        h16.grad = emb16.grad = None
        got = chunked_distillation_loss(h16, emb16, labels, teacher_hidden=th16, teacher_weight=tw16,
                                        real_vocab_size=real, chunk_size=5, divergence=name)
        got.backward()
        assert got.dtype == torch.float32 and emb16.grad.dtype == h16.grad.dtype == torch.bfloat16
        h64, e64 = h16.detach().double().requires_grad_(), emb16.detach().double().requires_grad_()
        want = distillation_loss(F.linear(h64, e64), F.linear(th16.double(), tw16.double()), labels,
                                 real_vocab_size=real, divergence=name)
        want.backward()
        assert rel_err(got.double(), want) < 1e-2
        assert rel_err(emb16.grad.double(), e64.grad) < 3e-2
        assert rel_err(h16.grad.double(), h64.grad) < 3e-2


def test_chunked_validation():
    emb, ids, proj, th, tw, labels, real = chunked_case(seed=43)
    h = student_hidden(emb, ids, proj)
    with pytest.raises(ValueError, match="teacher"):
        chunked_distillation_loss(h, emb, labels, real_vocab_size=real)
    with pytest.raises(ValueError, match="teacher"):
        chunked_distillation_loss(
            h, emb, labels, teacher_hidden=th, teacher_weight=tw, teacher_logits_fn=lambda r: th, real_vocab_size=real
        )
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss(h, emb, labels, teacher_hidden=th, teacher_weight=tw, real_vocab_size=real,
                                  chunk_size=0)


def test_chunked_forward_kl_compiled_terms_match_eager():
    # compile=True 走 torch.compile 融合的逐元素路径：值与梯度与默认（eager）路径相同，且编译真的发生了。
    from conftest import dynamo_graph_count, fresh_dynamo
    from functional_lm.losses import chunked_distillation_loss

    fresh_dynamo()
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=gen)
    weight = torch.randn(40, 8, generator=gen)
    t_hidden = torch.randn(2, 5, 6, generator=gen)
    t_weight = torch.randn(44, 6, generator=gen)
    labels = torch.randint(0, 37, (2, 5), generator=gen)
    labels[1, 2] = -100
    results = []
    for compile_ in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = chunked_distillation_loss(
            h, w, labels, teacher_hidden=t_hidden, teacher_weight=t_weight, real_vocab_size=37,
            chunk_size=4, compile=compile_,
        )
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert results[1][2][37:].abs().max() == 0
    assert dynamo_graph_count() >= 1  # 逐块的融合函数被 dynamo 捕获（不是悄悄退回 eager）


# ----------------------------------------------------------------------------------------------
# 被屏蔽的列（logit = −∞）：0·log 0 = 0，数值与梯度有限，且等于删去这些列后的答案
# ----------------------------------------------------------------------------------------------

MASKED = [2, 7, 8, 19]  # 被屏蔽的列（词表 30 列）
MASK_CASES = ["student", "both"]  # 只有学生为 −∞ / 师生两侧同一些列为 −∞


def kept_columns(v):
    return torch.tensor([i for i in range(v) if i not in MASKED])


def masked_case(case, seed=50, b=2, t=5, v=30):
    """学生（case = "both" 时还有教师）在 MASKED 列上为 −∞；标签只取未屏蔽的列。
    教师在这些列上的 logit 先减 10：只屏蔽学生时教师仍有质量，但不进稀疏版的 top-5。"""
    s, te = make_logits(b, t, v, seed=seed), make_logits(b, t, v, seed=seed + 1)
    te[..., MASKED] -= 10.0
    kept = kept_columns(v)
    g = torch.Generator().manual_seed(seed + 2)
    labels = kept[torch.randint(0, len(kept), (b, t), generator=g)]
    labels[0, 1] = -100
    s[..., MASKED] = float("-inf")
    if case == "both":
        te[..., MASKED] = float("-inf")
    return s, te, labels, kept


def masked_reference_probs(s_kept, t, kept, case, temperature):
    """参考分布（float64，概率空间）：两侧都屏蔽时把这些列从两侧删去；只屏蔽学生时教师保留完整分布，
    学生在这些列上的概率是常数 0（不依赖学生 logits，所以对 s_kept 的梯度只来自未屏蔽列）。"""
    q_kept = ref_probs(s_kept, temperature)
    if case == "both":
        return ref_probs(t[..., kept], temperature), q_kept
    q = torch.zeros(*q_kept.shape[:-1], t.shape[-1], dtype=q_kept.dtype).index_copy(-1, kept, q_kept)
    return ref_probs(t, temperature), q


def masked_reference_loss(s_kept, t, labels, kept, case, name, *, alpha=0.5, temperature=2.0, coarse_ids=None):
    """α·T²·mean D + (1−α)·mean CE，全部在删去被屏蔽列后的学生 logits 上算（标签换成删列后的下标）。
    coarse_ids 给出时 D 在"top-k 各一桶 + 其余一桶"的划分上算（稀疏版）。"""
    p, q = masked_reference_probs(s_kept, t, kept, case, temperature)
    if coarse_ids is not None:
        if case == "both":  # 删列后的下标
            coarse_ids = torch.searchsorted(kept, coarse_ids)
        p, q = (torch.cat([x.gather(-1, coarse_ids), x.scatter(-1, coarse_ids, 0.0).sum(-1, keepdim=True)], -1)
                for x in (p, q))
    kd = ref_divergence(name, p, q, kl=zero_safe_kl)
    valid = labels != -100
    position = torch.searchsorted(kept, labels.clamp(min=0))
    ce = -torch.log(ref_probs(s_kept, 1.0).gather(-1, position[..., None])[..., 0])
    kd_mean, ce_mean = (torch.where(valid, x, 0).sum() / valid.sum() for x in (kd, ce))
    return alpha * temperature**2 * kd_mean + (1 - alpha) * ce_mean


def forward_kl_analytic_grad(s, t, labels, alpha, temperature):
    """∂loss/∂s = [α·T·(softmax(s/T) − softmax(t/T)) + (1−α)·(softmax(s) − onehot)]/N（有效 token）。"""
    valid = (labels != -100)[..., None]
    q_t, p_t = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    onehot = F.one_hot(labels.clamp(min=0), s.shape[-1]).to(s.dtype)
    grad = alpha * temperature * (q_t - p_t) + (1 - alpha) * (torch.softmax(s, -1) - onehot)
    return torch.where(valid, grad, 0) / valid.sum()


FINITE_MASK_CASES = [(n, c) for n in DIVERGENCES for c in MASK_CASES if (n, c) != ("forward_kl", "student")]


@pytest.mark.parametrize("name,case", FINITE_MASK_CASES)
def test_minus_inf_columns_plain_equals_columns_removed(name, case):
    """普通版与 token_divergence：−∞ 列按 0·log 0 = 0 处理，值与梯度有限，等于删去这些列后的 float64 参考；
    被屏蔽列上的梯度恰为 0。（只屏蔽学生的前向 KL 真为无穷，见下一个测试。）"""
    s, t, labels, kept = masked_case(case)
    s = s.requires_grad_()
    s_kept = s.detach()[..., kept].clone().requires_grad_()
    p, q = masked_reference_probs(s_kept.detach(), t, kept, case, 2.0)
    got_kd = token_divergence(s.detach(), t, divergence=name)
    torch.testing.assert_close(got_kd, ref_divergence(name, p, q, kl=zero_safe_kl), rtol=1e-10, atol=1e-12)
    loss = distillation_loss(s, t, labels, divergence=name)
    (g,) = torch.autograd.grad(loss, s)
    want = masked_reference_loss(s_kept, t, labels, kept, case, name)
    (g_want,) = torch.autograd.grad(want, s_kept)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g[..., kept], g_want, rtol=1e-9, atol=1e-12)
    assert (g[..., MASKED] == 0).all()


def test_forward_kl_teacher_mass_on_student_minus_inf_is_inf_with_analytic_gradient():
    """教师在学生为 −∞ 的列上有质量：KL(P‖Q) 真为 +∞（不修饰），梯度仍是有限的解析式 α·T·(Q − P)/N + …。"""
    s, t, labels, _ = masked_case("student")
    s = s.requires_grad_()
    assert torch.isinf(token_divergence(s.detach(), t)).all()
    loss = distillation_loss(s, t, labels, alpha=0.3, temperature=1.5)
    (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == math.inf
    torch.testing.assert_close(g, forward_kl_analytic_grad(s.detach(), t, labels, 0.3, 1.5), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case,k", [("student", 5), ("both", 5), ("both", 26)])  # 26 = 未屏蔽列数：尾部只剩被屏蔽列
@pytest.mark.parametrize("name", DIVERGENCES)
def test_minus_inf_columns_sparse_equals_columns_removed(name, case, k):
    """稀疏版：−∞ 列在学生的 top-k 或尾部桶里（k = 26 时两侧尾部质量都恰为 0），值与梯度都有限，
    等于在删去这些列后的同一划分上求的 float64 参考。"""
    s, t, labels, kept = masked_case(case)
    ids, logp, tail = teacher_topk(t, k, temperature=2.0)
    assert not torch.isin(ids, torch.tensor(MASKED)).any()  # 前提：教师的 top-k 都是未屏蔽列
    s = s.requires_grad_()
    s_kept = s.detach()[..., kept].clone().requires_grad_()
    loss = sparse_distillation_loss(s, ids, logp, labels, teacher_tail_mass=tail, divergence=name)
    (g,) = torch.autograd.grad(loss, s)
    want = masked_reference_loss(s_kept, t, labels, kept, case, name, coarse_ids=ids)
    (g_want,) = torch.autograd.grad(want, s_kept)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g[..., kept], g_want, rtol=1e-9, atol=1e-12)
    assert (g[..., MASKED] == 0).all()


def chunked_masked_case(case, seed=60, n=11, d=6, v=30):
    """分块版的学生 logits 是 h·Wᵀ：h 的第 0 维恒为 1、W 的被屏蔽行为 (−∞, 0, …, 0)，这些列的 logit 就恰为 −∞。
    教师 logits 经 teacher_logits_fn 给出；case = "none" 时不屏蔽任何列。"""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    h[:, 0] = 1.0
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    t = 3.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    t[:, MASKED] -= 4.0
    if case != "none":
        w[MASKED] = 0.0
        w[MASKED, 0] = float("-inf")
    if case == "both":
        t[:, MASKED] = float("-inf")
    kept = kept_columns(v)
    labels = kept[torch.randint(0, len(kept), (n,), generator=g)]
    labels[3] = -100
    return h, w.requires_grad_(), t, labels, kept


@pytest.mark.parametrize("case", ["none", *MASK_CASES])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_with_minus_inf_columns_equals_plain(name, case, monkeypatch):
    """分块版（前向与反向 KL 走写解析梯度的快速路径，其余散度走 autograd 的通用路径）与普通版的值和 ∂W 相同，
    有 −∞ 列时也有限；行块切成每块 2 行，使快速路径的逐行块归约确实分成多块。
    h 不求梯度：h·Wᵀ 的反向 g·W 含 0·(−∞)，那是矩阵乘法本身的事，与损失无关。"""
    monkeypatch.setattr(chunked_engine, "_CPU_BLOCK_ELEMS", 2 * 30)
    h, w, t, labels, kept = chunked_masked_case(case)
    kw = dict(divergence=name, temperature=1.7, alpha=0.4)
    plain = distillation_loss(F.linear(h, w), t, labels, **kw)
    (g_plain,) = torch.autograd.grad(plain, w)
    got = chunked_distillation_loss(h, w, labels, teacher_logits_fn=lambda rows: t[rows], chunk_size=5, **kw)
    (g_got,) = torch.autograd.grad(got, w)
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(got, plain, rtol=1e-10, atol=1e-12)  # 只屏蔽学生的前向 KL：两边都是 +∞
    torch.testing.assert_close(g_got, g_plain, rtol=1e-10, atol=1e-13)
    with torch.no_grad():  # 不需要梯度时前向 KL 也走通用路径
        no_grad = chunked_distillation_loss(h, w, labels, teacher_logits_fn=lambda rows: t[rows], chunk_size=5, **kw)
    torch.testing.assert_close(no_grad, plain.detach(), rtol=1e-10, atol=1e-12)
    if case != "none" and (name, case) != ("forward_kl", "student"):
        w_kept = w.detach()[kept].clone().requires_grad_()
        want = masked_reference_loss(F.linear(h, w_kept), t, labels, kept, case, name, alpha=0.4, temperature=1.7)
        (g_want,) = torch.autograd.grad(want, w_kept)
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_got[kept], g_want, rtol=1e-9, atol=1e-12)
        assert (g_got[MASKED] == 0).all()


@pytest.mark.parametrize("case", MASK_CASES)
def test_chunked_compiled_forward_kl_with_minus_inf_columns(case):
    """compile=True（torch.compile 融合的 _forward_kl_terms）在 −∞ 列上与普通版一致：值有限（只屏蔽学生时为 +∞），
    ∂W 有限且等于普通版的 autograd 梯度。"""
    h, w, t, labels, _ = chunked_masked_case(case)
    plain = distillation_loss(F.linear(h, w), t, labels, temperature=1.7, alpha=0.4)
    (g_plain,) = torch.autograd.grad(plain, w)
    got = chunked_distillation_loss(h, w, labels, teacher_logits_fn=lambda rows: t[rows], chunk_size=5,
                                    temperature=1.7, alpha=0.4, compile=True)
    (g_got,) = torch.autograd.grad(got, w)
    assert torch.isfinite(g_got).all()
    assert torch.isfinite(got) == (case == "both")
    torch.testing.assert_close(got, plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_plain, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# 小 KL 的精度：float32、V = 32768、教师 ≈ 学生
# ----------------------------------------------------------------------------------------------


def near_identical_float32(noise, n=16, v=32768, seed=70):
    """float32 学生 logits（h·Wᵀ，std ≈ 3）与只差 noise·N(0, 1) 的教师 logits；noise = 0.01 时 KL ≈ 5e-5。"""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 16, generator=g)
    w = 0.75 * torch.randn(v, 16, generator=g)
    s = F.linear(h, w)
    t = s + noise * torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    return h, w, s, t, labels


def float64_kl(s, t):
    """同一组 float32 logits 在 float64 中的 (前向 KL, 反向 KL)，T = 1。"""
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    return {"forward_kl": ref_kl(p, q), "reverse_kl": ref_kl(q, p)}


# 实测（3 个种子 × 64 token）：新写法逐 token 相对误差中位数约 3e-6、最大约 3e-5；
# 旧写法 Σa·log a − Σa·log b 中位数约 13%（还出现负值）；逐元素但不加 Σ(b − a) 修正时中位数约 4e-3。
SMALL_KL_RTOL = 2e-4


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_small_kl_float32_matches_float64(name):
    h, w, s, t, labels = near_identical_float32(noise=0.01)
    want = float64_kl(s, t)[name]
    assert 2e-5 < want.median() < 1e-4  # 前提：确实是 KL ≈ 5e-5 的情形
    got = token_divergence(s, t, divergence=name, temperature=1.0)
    assert got.dtype == torch.float32 and (got >= 0).all()
    assert ((got.double() - want).abs() / want).max() < SMALL_KL_RTOL
    kw = dict(divergence=name, temperature=1.0, alpha=1.0, return_parts=True)
    _, plain = distillation_loss(s, t, labels, **kw)
    # 分块版：前向 KL 走快速路径（逐行块求值），反向 KL 走通用路径
    _, chunked = chunked_distillation_loss(h.requires_grad_(), w, labels, teacher_logits_fn=lambda rows: t[rows],
                                           chunk_size=8, **kw)
    for parts in (plain, chunked):
        assert abs(parts["kd"].double() - want.mean()) / want.mean() < SMALL_KL_RTOL


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_tiny_kl_float32_is_never_negative(name):
    """KL ≈ 5e-9 时舍入误差与 KL 本身同量级：报告值仍 ≥ 0，且量级正确。"""
    h, w, s, t, labels = near_identical_float32(noise=1e-4)
    want = float64_kl(s, t)[name]
    got = token_divergence(s, t, divergence=name, temperature=1.0)
    assert (got >= 0).all()
    assert ((got.double() - want).abs() / want).median() < 1e-2
    _, parts = chunked_distillation_loss(h.requires_grad_(), w, labels, teacher_logits_fn=lambda rows: t[rows],
                                         chunk_size=8, divergence=name, temperature=1.0, return_parts=True)
    assert parts["kd"] >= 0


def test_fast_path_sub_blocks_policy():
    """快速路径的行块：CPU 上每块 ≤ 2^18 个元素（V = 151,665 → 1 行，V = 32,768 → 8 行），
    其他设备上一块 c 行至多切 16 块；各块首尾相接、覆盖全部行。"""
    def sizes(rows, cols, device):
        x = torch.empty(1, device=device).expand(rows, cols)  # 不分配 (rows × cols) 内存
        blocks = chunked_engine._sub_blocks(x)
        assert blocks[0].start == 0 and blocks[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        return [b.stop - b.start for b in blocks]

    assert sizes(256, 151665, "cpu") == [1] * 256
    assert sizes(20, 32768, "cpu") == [8, 8, 4]
    assert sizes(256, 151665, "meta") == [16] * 16
    assert sizes(40, 151665, "meta") == [3] * 13 + [1]


def test_reported_divergence_clamp_keeps_gradient():
    """报告值夹到 ≥ 0（舍入造成的微小负值变成 0，+∞ 保持 +∞），梯度原样直通（不被夹断）。"""
    x = torch.tensor([-1e-12, 0.0, 0.25, math.inf], dtype=torch.float64, requires_grad=True)
    y = dense_divergences._nonnegative(x)
    assert y.tolist() == [0.0, 0.0, 0.25, math.inf]
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    (g,) = torch.autograd.grad((y * weights).sum(), x)
    assert g.tolist() == weights.tolist()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd"])
@pytest.mark.parametrize("k", [5, 45])
def test_chunked_sparse_loss_equals_the_plain_sparse_loss(divergence, k):
    # 分块的稀疏教师损失（教师缓存与在线 top-k 蒸馏用它）：值与对 h、W 的梯度都等于普通版作用在 h·Wᵀ 上；
    # k = 45 即全部真实词表（没有尾部桶），填充列 45…49 被排除。
    from functional_lm.losses import chunked_sparse_distillation_loss

    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 45, (2, 7), generator=g)
    labels[0, 2] = -100
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5] = False
    ids, log_p, tail = teacher_topk(torch.randn(2, 7, 50, generator=g) * 3, k, temperature=2.0, real_vocab_size=45)
    common = dict(teacher_tail_mass=tail, real_vocab_size=45, divergence=divergence, loss_mask=mask, alpha=0.7)
    plain = sparse_distillation_loss(h @ w.T, ids, log_p, labels, **common)
    chunked = chunked_sparse_distillation_loss(h, w, labels, ids, log_p, chunk_size=3, **common)
    assert torch.allclose(chunked, plain, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(plain, (h, w)), torch.autograd.grad(chunked, (h, w))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_forward_and_reverse_kl_take_the_analytic_path_not_autograd(divergence, monkeypatch):
    """前向与反向 KL 的分块版不在块上建 autograd 图（_generic_chunk 不被调用），值与梯度等于普通版。"""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(40, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.randn(40, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 40, (9,), generator=gen)
    kw = dict(divergence=divergence, temperature=1.3, alpha=0.7)
    plain = distillation_loss(F.linear(h, w), F.linear(th, tw), labels, **kw)
    (g_plain,) = torch.autograd.grad(plain, w)

    def refuse(*_args):
        raise AssertionError("the generic autograd chunk ran")

    monkeypatch.setattr(chunked_engine, "_generic_chunk", refuse)
    got = chunked_distillation_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, chunk_size=4, **kw)
    (g_got,) = torch.autograd.grad(got, w)
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_got, g_plain, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_rows_that_carry_no_loss_are_never_computed(divergence):
    """被遮的行（提示、填充）不进入分块计算：把它们的隐藏状态换成 NaN，损失与梯度不变、全部有限，
    被遮行的 ∂h 恰为 0。（逐块计算全部行时，NaN 会经 0·NaN 流进 ∂W。）"""
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(2, 7, 6, generator=gen)
    w = torch.randn(40, 6, generator=gen)
    th, tw = torch.randn(2, 7, 5, generator=gen), torch.randn(40, 5, generator=gen)
    labels = torch.randint(0, 40, (2, 7), generator=gen)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)

    def run(hidden, teacher_hidden):
        leaf_h, leaf_w = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        loss = chunked_distillation_loss(leaf_h, leaf_w, labels, teacher_hidden=teacher_hidden, teacher_weight=tw,
                                         chunk_size=3, divergence=divergence, alpha=0.5, loss_mask=mask)
        loss.backward()
        return loss.detach(), leaf_h.grad, leaf_w.grad

    clean = run(h, th)
    poisoned = run(h.masked_fill(~mask[..., None], float("nan")), th.masked_fill(~mask[..., None], float("nan")))
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.count_nonzero(poisoned[1][~mask]) == 0
    reference = distillation_loss(F.linear(h, w), F.linear(th, tw), labels, divergence=divergence, alpha=0.5,
                                  loss_mask=mask)
    torch.testing.assert_close(clean[0], reference, rtol=1e-5, atol=1e-6)
