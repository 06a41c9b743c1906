"""Every default lives in one place (ssl_hybrid/config.py, or one named constant): a scan of the package's
source for config defaults written out again as literals, plus the two defaults that have no config key
(the evaluation crop and the attention top-k)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from ssl_hybrid import config as cfg

PACKAGE = Path(cfg.__file__).resolve().parent

# Values that mean "off" / "none" / "identity" rather than a tuned choice: writing them twice says nothing.
NEUTRAL = (0, 0.0, 1, 1.0, "", True, False, None, "no")


def scanned(where: str) -> bool:
    """Not scanned: the models' factories are timm's API (``timm.create_model("hybrid_tiny")`` works without a
    config; the trainer passes every config value explicitly), and a benchmark's setup is fixed on purpose
    (changing a training default must not silently change what committed benchmark figures measured)."""
    return where != "config.py" and not where.startswith("models/") and not where.endswith("bench.py")

# (file, name): why the same value there is a different setting.
ALLOWED = {
    ("eval/finetune.py", "warmup_fraction"): "FinetuneSettings' own schedule (fine-tuning), not optim.warmup_fraction",
    ("search/run.py", "image_size"): "the size search constraints are measured at (deployment), not data.image_size",
}


def config_defaults() -> dict[str, list[tuple[str, object]]]:
    """Config leaf name -> [(dotted key, default)], neutral values left out."""
    leaves: dict[str, list[tuple[str, object]]] = {}
    for key, value, _ in cfg.describe_fields():
        if not any(type(value) is type(n) and value == n for n in NEUTRAL):
            leaves.setdefault(key.rsplit(".", 1)[-1], []).append((key, value))
    return leaves


def keys_named(name: str, leaves: dict) -> list[tuple[str, object]]:
    """Config keys a parameter called ``name`` stands for: the same leaf name, or, for a name that is no
    config leaf, a leaf that ends or starts with it (temperature -> knn_temperature, norm_pix -> norm_pix_loss)."""
    if name in leaves:
        return leaves[name]
    return [item for leaf, items in leaves.items() if leaf.endswith(f"_{name}") or leaf.startswith(f"{name}_")
            for item in items]


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def named_defaults(tree: ast.AST):
    """(name, default node) of every function parameter default, class-level annotated field and argparse
    ``add_argument`` default in a module."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = args.posonlyargs + args.args
            yield from ((a.arg, d) for a, d in zip(positional[len(positional) - len(args.defaults):], args.defaults))
            yield from ((a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)
        elif isinstance(node, ast.ClassDef):
            yield from ((s.target.id, s.value) for s in node.body
                        if isinstance(s, ast.AnnAssign) and s.value is not None and isinstance(s.target, ast.Name))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flag = _literal(node.args[0]) if node.args else None
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if isinstance(flag, str) and default is not None:
                yield flag.lstrip("-").replace("-", "_"), default


def repeated_defaults(source: str, where: str, leaves: dict) -> list[str]:
    found = []
    for name, node in named_defaults(ast.parse(source)):
        value = _literal(node)
        for key, default in keys_named(name, leaves):
            if type(value) is type(default) and value == default and (where, name) not in ALLOWED:
                found.append(f"{where}:{node.lineno}: {name}={value!r} repeats {key}'s default")
    return found


def test_no_config_default_is_written_twice():
    leaves = config_defaults()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        if scanned(where):
            found += repeated_defaults(path.read_text(encoding="utf-8"), where, leaves)
    assert not found, "read these from ssl_hybrid.config (e.g. EvalConfig.knn_k) instead:\n" + "\n".join(found)


def test_the_scan_finds_a_repeated_default():
    leaves = config_defaults()
    source = ("def knn(k: int = 20, temperature: float = 0.07, seed: int = 0): ...\n"
              "class Settings:\n    pooling: str = 'multiscale'\n    norm_pix: bool = True\n"
              "parser.add_argument('--batch-size', type=int, default=128)\n")
    found = repeated_defaults(source, "example.py", leaves)
    assert [line.split(": ", 1)[1] for line in found] == [
        "k=20 repeats eval.knn_k's default", "temperature=0.07 repeats eval.knn_temperature's default",
        "pooling='multiscale' repeats eval.pooling's default", "batch_size=128 repeats eval.batch_size's default"]


def test_every_allowed_exception_still_exists():
    for where, name in ALLOWED:
        names = {n for n, _ in named_defaults(ast.parse((PACKAGE / where).read_text(encoding="utf-8")))}
        assert name in names, f"{where} no longer sets {name}: drop it from ALLOWED"


def test_crop_pct_is_one_value_in_the_models_and_the_evaluation():
    import timm

    import ssl_hybrid  # noqa: F401  (registers the models)
    from ssl_hybrid.eval.features import eval_transform
    from ssl_hybrid.models.contract import EVAL_CROP_PCT

    for name in ("hybrid_nano", "resvit_nano"):
        assert timm.create_model(name).pretrained_cfg["crop_pct"] == EVAL_CROP_PCT
    # the value every committed evaluation number was made with; the resize side is rounded (110 at 96 px)
    assert EVAL_CROP_PCT == 0.875
    assert [eval_transform(size).transforms[0].size for size in (224, 96, 32)] == [256, 110, 37]


def test_attention_sparsity_defaults_belong_to_the_model():
    import timm

    import ssl_hybrid  # noqa: F401
    from ssl_hybrid.models.attention import Attention
    from ssl_hybrid.models.hybrid import Block, HybridViT

    for cls, names in ((Attention, ("attn_mode", "window_size", "topk")),
                       (Block, ("attn_mode", "window_size", "attn_topk"))):
        params = inspect.signature(cls).parameters
        assert all(params[n].default is inspect.Parameter.empty for n in names), cls
    model_defaults = inspect.signature(HybridViT).parameters
    model = timm.create_model("hybrid_nano", attn_mode="topk")
    assert model_defaults["attn_topk"].default == 49  # what the default models always ran with
    assert {block.attn.topk for block in model.blocks} == {49}
    assert {block.attn.window_size for block in model.blocks} == {model_defaults["window_size"].default}


@pytest.mark.parametrize("key", ["eval.knn_k", "eval.knn_temperature", "eval.pooling", "eval.batch_size"])
def test_evaluation_functions_default_to_the_config(key):
    from ssl_hybrid.eval import features, knn, report

    group, name = key.split(".")
    value = getattr(cfg.EvalConfig, name)
    param = {"knn_k": "k", "knn_temperature": "temperature"}.get(name, name)
    functions = {"knn_k": [knn.knn_predict], "knn_temperature": [knn.knn_predict, knn.knn_evaluate, knn.vote],
                 "pooling": [features.cached_features, features.features_for_spec, report.build_report],
                 "batch_size": [features.cached_features, features.features_for_spec, report.build_report]}[name]
    for function in functions:
        assert inspect.signature(function).parameters[param].default == value, function.__name__


def test_attention_modes_are_one_tuple_in_the_torch_free_config():
    import subprocess
    import sys

    from ssl_hybrid.models import attention, hybrid

    assert attention.ATTN_MODES is cfg.ATTN_MODES and hybrid.ATTN_MODES is cfg.ATTN_MODES
    assert cfg._CHOICES["model.attn_mode"] is cfg.ATTN_MODES
    probe = "import sys, ssl_hybrid.config; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_the_eval_commands_take_their_defaults_from_the_eval_group():
    from ssl_hybrid.cli import build_parser

    defaults = cfg.EvalConfig()
    parser = build_parser()
    report = parser.parse_args(["report", "random:hybrid_nano"])
    fewshot = parser.parse_args(["fewshot", "random:hybrid_nano"])
    for args in (report, fewshot):
        assert args.shots == ",".join(map(str, defaults.shots)) and args.seeds == defaults.seeds
        assert args.method == ",".join(defaults.methods) and args.fewshot_protocol == defaults.fewshot_protocol
        assert (args.workers, args.image_size, args.batch_size) == (defaults.num_workers, 0, defaults.batch_size)
    assert report.knn_protocol == defaults.knn_protocol
    assert parser.parse_args(["linear", "random:hybrid_nano"]).holdout == defaults.linear_holdout
    assert parser.parse_args(["embed", "random:hybrid_nano", "x", "--out", "y"]).workers == defaults.num_workers
