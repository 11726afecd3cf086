"""Claims 1-5, checked by watching real forward passes of every preset."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from app.nn import PRESETS, create_model
from app.nn.resnet import Bottleneck, ProjectionShortcut, count_parameters

CASES = [("fashion", 10), ("fashion-small", 10), ("resnet50", 1000), ("resnet101", 1000)]


@dataclass
class Event:
    name: str
    module: nn.Module
    in_ptr: int
    out_ptr: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_min: float


def trace(model: nn.Module, x: torch.Tensor) -> tuple[list[Event], torch.Tensor]:
    """Every leaf module's execution, in order, with the storage of its input and output."""
    events: list[Event] = []
    handles = []
    for name, m in model.named_modules():
        if list(m.children()):
            continue

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor,
                 name: str = name) -> None:
            inp = args[0]
            events.append(Event(name, mod, inp.data_ptr(), out.data_ptr(), tuple(inp.shape),
                                tuple(out.shape), float("nan")))

        def pre(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            mod._in_min = float(args[0].min())  # type: ignore[assignment]

        handles.append(m.register_forward_hook(hook))
        handles.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    for e in events:
        e.in_min = e.module._in_min  # type: ignore[assignment]
    return events, out


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def traced(request: pytest.FixtureRequest) -> tuple[str, nn.Module, list[Event], torch.Tensor]:
    preset, classes = request.param
    torch.manual_seed(0)
    model = create_model(preset, classes, zero_init_last=False).eval()
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    events, out = trace(model, x)
    return preset, model, events, out


def test_stem_comes_first_and_nothing_before_it(traced) -> None:  # claim 2
    _, model, events, _ = traced
    assert events[0].name == "stem" and isinstance(events[0].module, nn.Conv2d)
    assert events[1].name.startswith("stages.0.0.")  # the stem output feeds the first block


def test_every_conv_but_the_stem_runs_right_after_bn_relu_over_its_input(traced) -> None:
    _, _, events, _ = traced  # claims 3, 5
    convs = [i for i, e in enumerate(events) if isinstance(e.module, nn.Conv2d)]
    assert len(convs) > 3
    for i in convs[1:]:
        conv, relu, bn = events[i], events[i - 1], events[i - 2]
        assert isinstance(bn.module, nn.BatchNorm2d), conv.name
        assert isinstance(relu.module, nn.ReLU), conv.name
        assert bn.module.num_features == conv.module.in_channels
        # the conv consumes exactly the tensor the BN produced (ReLU is in place), rectified
        assert conv.in_ptr == relu.out_ptr == bn.out_ptr, conv.name
        assert conv.in_min >= 0.0, conv.name


def test_strides_sit_on_3x3_in_the_branch_and_1x1_on_shortcuts(traced) -> None:  # claims 1, 4
    _, model, events, _ = traced
    strided = [e for e in events if isinstance(e.module, nn.Conv2d) and e.name != "stem"
               and e.module.stride != (1, 1)]
    assert strided
    for e in strided:
        k, s = e.module.kernel_size, e.module.stride
        if e.name.endswith("branch.conv2"):
            assert k == (3, 3) and s == (2, 2)
        else:
            assert e.name.endswith("shortcut.conv") and k == (1, 1) and s == (2, 2), e.name
        assert e.out_shape[-1] == (e.in_shape[-1] + 1) // 2  # it really downsamples here
    for block in (m for m in model.modules() if isinstance(m, Bottleneck)):
        c1, c2, c3 = block.branch.conv1, block.branch.conv2, block.branch.conv3
        assert c1.kernel_size == c3.kernel_size == (1, 1) and c2.kernel_size == (3, 3)
        assert c1.stride == c3.stride == (1, 1)
        # claim 1: kernel1 < kernel2; stride1 <= stride2 < kernel2 width (strict where strided)
        assert c1.kernel_size[0] < c2.kernel_size[0]
        assert c1.stride[0] <= c2.stride[0] < c2.kernel_size[0]


def test_first_block_of_each_stage_projects_others_are_identity(traced) -> None:  # claim 3
    _, model, _, _ = traced
    for stage in model.stages:
        blocks = list(stage)
        assert isinstance(blocks[0].shortcut, ProjectionShortcut)
        assert isinstance(blocks[0].shortcut.norm[0], nn.BatchNorm2d)
        assert all(isinstance(b.shortcut, nn.Identity) for b in blocks[1:])


def test_shapes_features_and_no_nan(traced) -> None:
    preset, model, _, out = traced
    cfg = model.config
    assert out.shape == (2, model.num_classes)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        f = model.features(x)
        logits = model.head(f)
    assert f.shape == (3, cfg.embedding_dim)
    assert (f >= 0).all()  # pooled after the final BN-ReLU
    assert logits.shape == (3, model.num_classes)
    assert torch.isfinite(out).all() and torch.isfinite(f).all()
    if preset.startswith("resnet"):
        assert cfg.embedding_dim == 2048 and cfg.stem_kernel == 7 and cfg.stem_stride == 2


def test_resnet_layouts_match_the_patent_project() -> None:
    assert PRESETS["resnet50"].depths == (3, 4, 6, 3)
    assert PRESETS["resnet101"].depths == (3, 4, 23, 3)
    m = create_model("resnet101", 1000)
    widths = [stage[0].branch.conv3.out_channels for stage in m.stages]
    assert widths == [256, 512, 1024, 2048]
    # within 0.1% of torchvision's ResNet-101 (44,549,160): same convs, pre-activation BNs
    assert abs(count_parameters(m) - 44_549_160) / 44_549_160 < 1e-3


def test_overrides_and_refusals() -> None:
    m = create_model("fashion", 5, depths=[1, 1, 1], widths=[8, 16, 32])
    assert m.embedding_dim == 128 and m.num_classes == 5
    with pytest.raises(ValueError, match="unknown preset"):
        create_model("resnet9000", 10)
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("fashion", 10, colour="red")
    with pytest.raises(ValueError, match="stride"):
        create_model("fashion", 10, strides=[3, 2, 2])


@pytest.mark.parametrize("preset", ["fashion", "resnet50"])
def test_folding_bns_for_inference_keeps_the_function(preset: str) -> None:
    from app.nn.fuse import fold_batchnorms

    torch.manual_seed(1)
    model = create_model(preset, 10, zero_init_last=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    folded = fold_batchnorms(model)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        assert torch.allclose(folded.features(x), model.features(x), rtol=1e-4, atol=1e-4)
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_folded = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert n_folded == n_bn - 2 * sum(cfg.depths)  # bn2 and bn3 of every block are gone
    with pytest.raises(ValueError):
        fold_batchnorms(model.train())
