"""FX tracing, the way timm checks its own models: ``test_model_forward_fx`` / ``test_model_backward_fx``
(timm's tests/test_models.py, repeated here because timm's tests are not part of its wheel) for every
registered variant of both families (``HYBRID_VARIANTS``, ``RESVIT_VARIANTS``) and each attention mode, plus
``timm.models.create_feature_extractor`` on the hybrids' multi-scale maps. The data-dependent parts (input-size
checks, position-embedding resampling, window fast path, top-k cap) are timm ``register_notrace_function``
leaves, so one traced graph serves any input size.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.models import create_feature_extractor as timm_feature_extractor
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import ssl_hybrid.models  # noqa: F401  (registers hybrid_*)
from ssl_hybrid.models import HYBRID_VARIANTS, RESVIT_VARIANTS
from tests.models.models_helpers import HYBRID_CASES, size_marks

# 64 px (4x4 patches) and 96 px (6x6) inputs on models built for 224 px: the graph resamples the
# position embedding and picks the attention path at run time, for any size (both sizes on the nano models).
SIZES = (64, 96)
CASES = [pytest.param(name, {}, id=name, marks=size_marks(name)) for name in HYBRID_VARIANTS + RESVIT_VARIANTS] + [
    pytest.param("hybrid_nano", dict(attn_mode="window", window_size=2), id="hybrid_nano-window2"),  # fast path
    pytest.param("hybrid_nano", dict(attn_mode="window", window_size=5), id="hybrid_nano-window5"),  # masked SDPA
    pytest.param("hybrid_nano", dict(attn_mode="topk", attn_topk=20), id="hybrid_nano-topk20"),  # k > tokens at 64 px
    # the default model's preset with the same sparse attention, and the conv-stage choice swapped on each preset
    pytest.param("resvit_nano", dict(attn_mode="window", window_size=2), id="resvit_nano-window2"),
    pytest.param("resvit_nano", dict(attn_mode="topk", attn_topk=5), id="resvit_nano-topk5"),
    pytest.param("resvit_nano", dict(conv_stages="convnext"), id="resvit_nano-convnext"),
    pytest.param("hybrid_nano", dict(conv_stages="resnet", stem_dim=16), id="hybrid_nano-resnet"),
]


@pytest.fixture(scope="module")
def built():
    """built(name, **kwargs) -> that model (42 classes), created once per module (hybrid_base takes seconds)."""
    cache: dict = {}

    def get(name: str, **kwargs) -> torch.nn.Module:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = timm.create_model(name, num_classes=42, **kwargs)
        model = cache[key]
        model.zero_grad(set_to_none=True)
        return model

    return get


def create_fx_model(model: torch.nn.Module, train: bool = False):
    """timm's ``_create_fx_model``: trace with timm's leaf modules/functions and return the last node
    (in train mode: the nodes feeding the graph's output)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-graph_node_names.index(name)] for name in output_node_names]
    return create_feature_extractor(
        model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes, tracer_kwargs=tracer_kwargs
    )


@pytest.mark.parametrize("name,kwargs", CASES)
def test_model_forward_fx(built, name, kwargs):
    model = built(name, **kwargs).eval()
    fx_model = create_fx_model(model)
    for size in SIZES if name.endswith("_nano") else SIZES[:1]:  # one size shows the rest on the big ones
        inputs = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            outputs = model(inputs)
            fx_outputs = torch.cat(tuple(fx_model(inputs).values()))
        assert torch.equal(fx_outputs, outputs), f"{size} px"
        assert outputs.shape == (1, 42) and not torch.isnan(outputs).any()


@pytest.mark.parametrize("name,kwargs", CASES)
def test_model_backward_fx(built, name, kwargs):
    model = built(name, **kwargs).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx_model(torch.randn(2, 3, SIZES[0], SIZES[0])).values()))
    outputs.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params


@pytest.mark.parametrize("name", HYBRID_CASES)
def test_fx_feature_extraction_matches_forward_intermediates(built, name):
    """Stage outputs by module name (timm's feature_info names): stride-4/8 maps are channels-last
    ``[B, H, W, C]``, block outputs ``[B, 1+N, C]`` tokens (class token first), ``norm`` the features."""
    model = built(name).eval()
    last = f"blocks.{len(model.blocks) - 1}"
    extractor = timm_feature_extractor(model, {"stage1": "s4", "stage2": "s8", last: "tokens", "norm": "features"})
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        out = extractor(x)
        s4, s8, blocks = model.forward_intermediates(
            x, indices=[0, 1, len(model.feature_info) - 1], output_fmt="NLC", intermediates_only=True
        )
        features = model.forward_features(x)
    assert out["s4"].shape == (2, 24, 24, model.feature_info[0]["num_chs"])
    assert torch.equal(out["s4"].flatten(1, 2), s4) and torch.equal(out["s8"].flatten(1, 2), s8)
    assert torch.equal(out["tokens"][:, 1:], blocks) and torch.equal(out["features"], features)


def test_token_selection_refuses_tracing_with_a_clear_message():
    model = timm.create_model("hybrid_nano", token_keep_rate=0.7).eval()
    with pytest.raises(torch.fx.proxy.TraceError, match=r"set_token_selection\(1\.0\)"):
        create_fx_model(model)
    model.set_token_selection(1.0)  # the advertised way out traces and matches
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(torch.cat(tuple(create_fx_model(model)(x).values())), model(x))


def test_fx_feature_extraction_of_resvit_stages_by_feature_info_names(built):
    """resvit_* stages are NCHW maps, its blocks ``[B, 1+N, C]`` tokens (timm's FeatureGraphNet names)."""
    model = built("resvit_nano").eval()
    names = {info["module"]: str(index) for index, info in enumerate(model.feature_info)}
    extractor = timm_feature_extractor(model, names)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        out = list(extractor(x).values())
        maps = model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
    assert len(out) == len(maps) == len(model.feature_info)
    for fx_out, expected in zip(out[:-1], maps[:-1]):
        assert torch.equal(fx_out, expected)
    tokens = out[-1][:, 1:].transpose(1, 2).reshape(maps[-1].shape)  # [B, 1+N, C] -> [B, C, H/16, W/16]
    assert torch.equal(tokens, maps[-1])
