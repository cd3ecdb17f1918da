"""包的平面图：楼层只向下导入、没有环、导入深度不超过 8 层、不导入别的模块的私有名字、文件不过长。

只读源码（ast），不导入本包：函数里的惰性导入同样计入（它们也是依赖）。楼层自上而下（GUIDE.md）：

    cli → kd → runs → (generate, hf) → models → (losses, layers, data, distributed, atomic, devices, allocator)
        → (config, shapes, errors)

同一层内可以互相导入（例如 kd.trainer → kd.step），但不能成环。
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "functional_lm"
# 模块（点路径的第一段，相对 functional_lm）→ 楼层号，越大越高。
FLOORS = {
    "config": 0, "shapes": 0, "errors": 0,
    "atomic": 1, "devices": 1, "allocator": 1, "layers": 1, "losses": 1, "data": 1, "distributed": 1,
    "models": 2, "model": 2,
    "generate": 3, "hf": 3,
    "runs": 4,
    "kd": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
}
MAX_DEPTH = 8
MAX_LINES = 650


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """functional_lm.x.y.z → 存在的最长模块名（from a.b import c 里的 c 可能是名字，也可能是子模块）。"""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(text: str, module: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """一段源码导入了本包的哪些模块、从中取了哪些名字——顶层与函数里的都算；TYPE_CHECKING 块里的只为注解，
    不算依赖。"""
    tree = ast.parse(text)
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("functional_lm") and not node.level:
            for alias in node.names:
                target = _resolve(f"{node.module}.{alias.name}")
                found.append((target, (alias.name,) if target == _resolve(node.module) else ()))
        elif isinstance(node, ast.Import):
            found += [(_resolve(a.name), ()) for a in node.names if a.name.startswith("functional_lm")]
    return tuple((t, names) for t, names in found if t and t != module)


@lru_cache(maxsize=None)
def _imports(module: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return imports_in(_modules()[module].read_text(encoding="utf-8"), module)


def _upward(module: str, imports) -> list[str]:
    """指向更高楼层的导入（包根 functional_lm 的 __init__ 是门面，不算）。"""
    return [t for t, _ in imports if t != "functional_lm" and _floor(t) > _floor(module)]


def _floor(module: str) -> int:
    head = module.split(".")[1] if "." in module else "__init__"
    return FLOORS[head]


def test_every_module_has_a_floor():
    unknown = sorted({m.split(".")[1] for m in _modules() if "." in m} - set(FLOORS))
    assert not unknown, f"modules without a floor in tests/test_layout.py: {unknown}"


def test_nothing_imports_upward():
    upward = {m: _upward(m, _imports(m)) for m in _modules()}
    assert not {m: u for m, u in upward.items() if u}, f"imports that point upward: {upward}"


def _unit(module: str) -> str:
    """一个模块所在的“房间”：包里的模块归它的文件夹（kd.trainer → kd），顶层模块就是它自己。"""
    return module.split(".")[1] if "." in module else "functional_lm"


def _chain(module: str, seen: tuple[str, ...] = ()) -> tuple[str, ...]:
    """从 module 出发跨楼层最多的一条导入链（模块层面）；遇到环就报出整条环。

    跨过的层数 = 链上相邻两个模块不在同一个房间的次数；同一个文件夹里的相邻模块算同一层（文件夹就是楼层）。"""
    if module in seen:
        raise AssertionError(f"import cycle: {' → '.join(seen + (module,))}")
    below = [_chain(t, seen + (module,)) for t in sorted({t for t, _ in _imports(module)})]
    return (module,) + max(below, key=lambda c: _floors((module,) + c), default=())


def _floors(chain: tuple[str, ...]) -> int:
    """一条链跨过几层：每换一个房间加一。"""
    units = [_unit(m) for m in chain]
    return sum(1 for a, b in zip(units, units[1:]) if a != b)


def test_no_cycle_and_at_most_eight_floors_deep():
    deepest = max((_chain(m) for m in _modules()), key=_floors)
    assert _floors(deepest) <= MAX_DEPTH, (
        f"the import chain {' → '.join(deepest)} crosses {_floors(deepest)} floors (limit {MAX_DEPTH})"
    )


def test_the_depth_count_sees_floors_not_files():
    chain = ("functional_lm.cli", "functional_lm.kd.trainer", "functional_lm.kd.step", "functional_lm.models.decoder",
             "functional_lm.layers", "functional_lm.shapes")
    assert _floors(chain) == 4  # cli → kd（trainer → step 同层）→ models → layers → shapes


def test_no_module_imports_another_modules_private_name():
    private = [(m, t, n) for m in _modules() for t, names in _imports(m) for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, f"private names imported across modules: {private}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_file_is_too_long(module):
    lines = _modules()[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{_modules()[module].relative_to(PACKAGE.parent)} has {lines} lines (limit {MAX_LINES})"


def test_the_checks_see_a_planted_upward_and_private_import():
    """这些检查本身能失败：楼层 1 的模块里种一个函数内的、指向 kd 私有名字的导入，两项检查都要发现它。"""
    planted = "def f():\n    from functional_lm.kd.trainer import _loop\n"
    imports = imports_in(planted, "functional_lm.layers")
    assert _upward("functional_lm.layers", imports) == ["functional_lm.kd.trainer"]
    assert [n for _, names in imports for n in names if n.startswith("_")] == ["_loop"]


# 包外的代码调用的公开路径（GUIDE.md）：文件怎样挪动，它们都照常导入。
PUBLIC = {
    "functional_lm": ["ModelConfig", "TrainingConfig", "init_params", "forward", "count_parameters", "get_preset"],
    "functional_lm.config": ["ModelConfig", "TrainingConfig", "PRESETS", "get_preset"],
    "functional_lm.model": ["init_params", "forward", "forward_hidden", "count_parameters"],
    "functional_lm.hf": ["load_pretrained", "save_pretrained", "config_from_hf"],
    "functional_lm.generate": ["generate", "generate_stream", "KVCache", "init_cache", "prefill", "decode_step"],
    "functional_lm.losses": ["distillation_loss", "chunked_distillation_loss", "token_divergence",
                             "sparse_distillation_loss", "chunked_sparse_distillation_loss", "teacher_topk"],
    "functional_lm.data": ["load_tokenizer", "prepare_data"],
    "functional_lm.layers": ["rms_norm", "apply_rope", "gqa_attention", "swiglu", "transformer_block"],
    "functional_lm.cli": ["main", "entry"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_paths_keep_importing(module):
    import importlib

    found = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(found, name)]
    assert not missing, f"{module} no longer offers {missing}"
