"""Residual-site analysis: exact sites, depths and survival on zoo models and hand-written ones."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import retrofit
from retrofit.analysis.residual import find_residual_sites
from retrofit.capture.trace import trace
from retrofit.layers import StochasticDepthGate
from tools.oracle import library_drop_path_owners

SD = {"stochastic_depth": {}}


def meta(factory, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return factory(*args, **kwargs)


def sd_edits(model: nn.Module, **spec) -> list[retrofit.Edit]:
    return retrofit.plan(model, {"stochastic_depth": spec}).by_kind("stochastic_depth")


# --- the zoo ---------------------------------------------------------------------------------


def test_resnet50_sixteen_sites_with_the_linear_rule():
    edits = sd_edits(meta(torchvision.models.resnet50))
    assert len(edits) == 16
    assert [e.module for e in edits[:4]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert [e.depth for e in edits] == list(range(1, 17))
    for e in edits:  # p_l = 1 - (l/L)(1 - p_L), L = 16, p_L = 0.5
        assert e.survival == pytest.approx(1 - e.depth / 16 * 0.5, abs=1e-12)
    assert edits[0].survival == 0.96875 and edits[-1].survival == 0.5
    assert all(
        e.action == "wrap_arg" and e.source.endswith("torchvision/models/resnet.py:160")
        for e in edits
    )


def test_uniform_schedule_and_custom_p_L():
    edits = sd_edits(meta(torchvision.models.resnet18), p_L=0.8, schedule="uniform")
    assert len(edits) == 8
    assert {e.survival for e in edits} == {0.8}


def test_timm_resnet50_matches_torchvision_structure():
    edits = sd_edits(meta(timm.create_model, "resnet50"))
    assert len(edits) == 16
    assert edits[3].module == "layer2.0" and edits[-1].module == "layer4.2"


def test_vit_b_16_two_sites_per_block_and_no_positional_embedding_site():
    edits = sd_edits(meta(torchvision.models.vit_b_16))
    assert len(edits) == 24
    assert len({e.depth for e in edits}) == 12
    assert [e.depth for e in edits[:4]] == [1, 1, 2, 2]
    owners = {e.module for e in edits}
    assert owners == {f"encoder.layers.encoder_layer_{i}" for i in range(12)}
    # Encoder.forward adds self.pos_embedding to the tokens: a parameter, not a branch.
    assert "encoder" not in owners


def test_efficientnet_b0_reuses_its_stochastic_depth_modules():
    model = meta(torchvision.models.efficientnet_b0)
    edits = sd_edits(model)
    assert len(edits) == 9
    assert all(e.action == "set_rate" for e in edits)
    assert all(e.target.endswith(".stochastic_depth") for e in edits)
    # batch mode skips the dropped branch's compute: the branch, slot included, is outlined
    # and the gate takes over (the slot stays, set to rate 0 by the rewrite)
    batch = sd_edits(model, mode="batch")
    assert all(e.action == "outline" and e.target.endswith(".stochastic_depth") for e in batch)


def test_convnext_tiny_and_swin_t_attention_bias_is_not_a_site():
    convnext = sd_edits(meta(torchvision.models.convnext_tiny))
    assert len(convnext) == 18 and all(e.action == "set_rate" for e in convnext)
    swin = sd_edits(meta(torchvision.models.swin_t))
    assert len(swin) == 24 and len({e.depth for e in swin}) == 12
    # every site is a block's residual; none inside the attention (bias table, shift mask)
    assert all(e.module.count(".") == 2 and e.module.startswith("features.") for e in swin)


def test_densenet121_has_no_residual_adds():
    assert sd_edits(meta(torchvision.models.densenet121)) == []


def test_mobilenet_v3_large_inverted_residuals():
    edits = sd_edits(meta(torchvision.models.mobilenet_v3_large))
    assert [e.module for e in edits] == [
        f"features.{i}" for i in (2, 4, 5, 7, 8, 9, 10, 12, 14, 15)
    ] or len(edits) == 10
    assert len(edits) == 10


@pytest.mark.parametrize(
    "arch",
    [
        "resnet26d",
        "convnext_atto",
        "vit_tiny_patch16_224",
        "deit_tiny_patch16_224",
        "beit_base_patch16_224",
        "swin_tiny_patch4_window7_224",
        "efficientnet_b0",
        "tf_efficientnetv2_b0",
        "mobilenetv3_small_100",
        "regnety_002",
        "repvgg_a0",
        "mobileone_s0",
        "convnextv2_atto",
        "davit_tiny",
        "focalnet_tiny_srf",
        "coatnet_0_rw_224",
        "maxvit_pico_rw_256",
        "efficientformer_l1",
        "poolformer_s12",
        "cait_xxs24_224",
    ],
)
def test_oracle_every_timm_drop_path_block_gets_a_gate(arch):
    """timm's own drop-path placement (built with a rate) ⊆ retrofit's sites (built without)."""
    with_rate = meta(timm.create_model, arch, drop_path_rate=0.1)
    library = library_drop_path_owners(with_rate)
    assert library, f"{arch}: timm applies no drop path?"
    ours = {s.owner for s in find_residual_sites(trace(meta(timm.create_model, arch)))}
    assert library <= ours, sorted(library - ours)


def test_known_false_positives_are_not_sites():
    # ConvNeXt-V2 GRN (γ·(x·n) + β + x), DaViT's conv position encoding, RepVGG/MobileOne
    # branch sums: exactly the blocks timm itself drops, nothing more.
    for arch in ("convnextv2_atto", "davit_tiny", "repvgg_a0", "mobileone_s0", "focalnet_tiny_srf"):
        ours = {s.owner for s in find_residual_sites(trace(meta(timm.create_model, arch)))}
        library = library_drop_path_owners(meta(timm.create_model, arch, drop_path_rate=0.1))
        assert ours == library, (arch, sorted(ours ^ library))


# --- hand-written models -------------------------------------------------------------------


class Branch(nn.Sequential):
    def __init__(self, c: int):
        super().__init__(
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )


class FunctionalBlocks(nn.Module):
    """Adds spelled four ways, a positional-embedding add, a GRN-like add and a CPE add."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.b1, self.b2, self.b3, self.b4 = (Branch(c) for _ in range(4))
        self.cpe = nn.Conv2d(c, c, 3, padding=1, groups=c)  # depthwise: a position encoding
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x) + self.pos  # not a site: the parameter does not depend on the input
        x = x + self.b1(x)
        x = torch.add(x, self.b2(x))
        y = self.b3(x)
        y += x
        x = y.add(self.b4(y))
        x = x + self.cpe(x)  # not a site: one depthwise conv
        n = x / (x.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-6).sqrt()
        x = self.gamma * (x * n) + x  # not a site: GRN-like, nothing learned in between
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(F.relu(self.a(x)))


class Nested(nn.Module):
    """A block whose branch contains another residual block."""

    def __init__(self, c):
        super().__init__()
        self.inner = Inner(c)
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv(self.inner(x))


class Looped(nn.Module):
    def __init__(self, c=8, n=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(Branch(c) for _ in range(n))
        self.nested = Nested(c)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.nested(x)


def test_functional_adds_every_spelling():
    edits = sd_edits(FunctionalBlocks())
    assert [e.module for e in edits] == ["", "", "", ""]
    # four distinct child blocks in one forward → four depth levels
    assert [e.block for e in edits] == ["b1", "b2", "b3", "b4"]
    assert [e.depth for e in edits] == [1, 2, 3, 4]


def test_loop_over_blocks_gives_each_add_its_own_depth_and_nested_residuals():
    edits = sd_edits(Looped())
    assert [(e.module, e.block, e.depth) for e in edits] == [
        ("", "blocks.0", 1),
        ("", "blocks.1", 2),
        ("", "blocks.2", 3),
        ("nested.inner", "nested.inner", 4),
        ("nested", "nested", 5),
    ]


class Untraceable(nn.Module):
    """Data-dependent control flow at the top; traceable blocks below."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Inner(4), Inner(4))

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            x = -x
        return self.blocks(x)


def test_hierarchical_fallback_instruments_the_blocks_and_reports_the_rest():
    model = Untraceable()
    plan = retrofit.plan(model, SD)
    assert [e.module for e in plan.edits] == ["blocks.0", "blocks.1"]
    assert [s.module for s in plan.skipped] == ["<root>"]
    assert "control flow" in plan.skipped[0].reason
    retrofit.apply(model, SD, example_input=torch.randn(2, 4, 8, 8))  # verified


# --- re-parameterisable sums, identity first (smp's MobileOne, timm's fastvit) -----------------


def _rep_sites(model: nn.Module) -> list[tuple[str, int | None, int, int]]:
    sites = find_residual_sites(trace(model))
    return [(s.owner, s.regroup, s.branch_weight, len(s.branch.split("+"))) for s in sites]


def test_identity_first_reparam_sums_are_read_as_one_sum():
    """``out = scale(x) + identity(x); out += conv_i(x)``: the last add is the site, its branch
    every conv-BN term (the scale branch included), its shortcut the identity BN (term #1).
    Before, the depthwise blocks (1, 3) were missed and the pointwise block 4 was gated at its
    first partial sum (``identity + conv_0``), leaving ``conv_1`` outside the branch."""
    from tests.wild_models import MobileOneNet

    assert _rep_sites(MobileOneNet()) == [
        ("blocks.1", 1, 2, 2),  # depthwise: scale + one conv
        ("blocks.2", None, 1, 1),  # pointwise, one conv: a plain identity + dense-map site
        ("blocks.3", 1, 4, 4),  # depthwise: scale + three convs
        ("blocks.4", 1, 2, 2),  # pointwise: two convs (``0 + identity`` is term #0, #1)
    ]
    sites = find_residual_sites(trace(MobileOneNet()))
    assert all(s.shortcut_weight == 0 for s in sites)
    assert all(s.shortcut.endswith("rbr_skip") for s in sites if s.regroup is not None)
    edits = sd_edits(MobileOneNet())
    assert [(e.module, e.regroup, e.arg) for e in edits] == [
        ("blocks.1", 1, 1),
        ("blocks.2", None, 1),
        ("blocks.3", 1, 1),
        ("blocks.4", 1, 1),
    ]


class RepSumSpellings(nn.Module):
    """One identity-like term and two parallel conv-BN terms, summed four ways."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(4))
        self.a = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, groups=c) for _ in range(4))
        self.b = nn.ModuleList(nn.Conv2d(c, c, 1, groups=c) for _ in range(4))

    def forward(self, x):
        x = (self.bn[0](x) + self.a[0](x)) + self.b[0](x)  # identity first
        x = self.a[1](x) + (x + self.b[1](x))  # identity in the middle, right-associated
        out = torch.add(self.a[2](x), self.b[2](x))
        out += x  # identity last, ``+=``: what the old rule found too
        x = out
        y = self.a[3](x)
        y = y.add(self.bn[3](x)).add(self.b[3](x))  # method spelling
        return y


def test_reparam_sum_in_any_association_and_spelling():
    sites = find_residual_sites(trace(RepSumSpellings()))
    assert [(s.regroup, s.branch_weight) for s in sites] == [(0, 2), (1, 2), (2, 2), (1, 2)]
    model = RepSumSpellings()
    for mode in ("row", "batch"):
        torch.manual_seed(0)
        retrofit.apply(
            model, {"stochastic_depth": {"mode": mode}}, example_input=torch.randn(2, 8, 8, 8)
        )
        model.train()
        model(torch.randn(2, 8, 8, 8)).sum().backward()
        retrofit.strip(model)


class NotReparamSums(nn.Module):
    """Sums of several terms that are not a re-parameterisable block."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, groups=c) for _ in range(4))
        self.head = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = self.head(x)
        x = self.c[0](x) + self.c[1](x) + self.c[2](x)  # Inception-like: no identity term
        x = self.head(x)
        return x + self.c[3](x) + 0  # one map and a constant: a position encoding


def test_sums_without_one_identity_and_parallel_single_maps_are_not_sites():
    assert find_residual_sites(trace(NotReparamSums())) == []


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_a_dropped_reparam_branch_leaves_exactly_the_identity_term(mode):
    """Every gate drops (p_l ~ 0): each identity-first block computes act(identity(x)) — the
    whole conv branch gated, the identity BN kept. In batch mode the dropped convs do not run
    (no gradient reaches them); in row mode they run and are multiplied by 0."""
    from tests.wild_models import MobileOneNet

    torch.manual_seed(0)
    model = MobileOneNet()
    x = torch.randn(2, 3, 16, 16)
    spec = {"p_L": 1e-9, "schedule": "uniform", "mode": mode, "seed": 0}
    model.eval()
    with torch.no_grad():
        before = model(x)
    retrofit.apply(model, {"stochastic_depth": spec}, example_input=x)
    with torch.no_grad():  # eval: the gate on each term, the author's order of summation
        assert torch.equal(model(x), before)
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    assert len(gates) == 4 and all(g.outlined == (mode == "batch") for g in gates)
    model.train()
    y = model(x)
    blocks = model.blocks
    with torch.no_grad():
        h = blocks[0](x)
        for i in (1, 2, 3, 4):
            h = blocks[i].act(blocks[i].rbr_skip(h))
        expected = model.head(blocks[6](blocks[5](h)).mean((2, 3)))
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    for i in (1, 3, 4):
        for conv in [*blocks[i].rbr_conv, blocks[i].rbr_scale]:
            if conv is None:
                continue
            grad = conv[0].weight.grad
            assert (grad is None) if mode == "batch" else bool((grad == 0).all())
        assert blocks[i].rbr_skip.weight.grad is not None


def test_sum_terms_and_regroup_keep_the_value():
    """``sum_terms`` flattens any association and ``+=``; ``regroup_sum`` puts the chosen term
    first and sums the rest in order (constants stay with the shortcut); a chain that writes a
    term in place (``x.add_(y) + z``) is not flattened."""
    import operator

    import torch.fx as fx

    from retrofit.analysis.sums import regroup_sum, sum_terms

    def f(x, y, z):
        out = 0 + torch.relu(x)
        out += y
        return (z * 2) + out

    gm = fx.symbolic_trace(f)
    last = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add][-1]
    chain = sum_terms(last)
    assert chain is not None
    assert [t if isinstance(t, int) else t.name for t in chain.terms] == ["mul", 0, "relu", "y"]
    assert len(chain.inner) == 2
    args = [torch.randn(3) for _ in range(3)]
    before = gm(*args)
    new = regroup_sum(gm.graph, last, 2)  # relu(x) + (z*2 + y), the 0 with relu(x)
    gm.recompile()
    assert new.args[0].args == (chain.terms[2], 0) and new.args[1].args[0].name == "mul"
    torch.testing.assert_close(gm(*args), before)

    def g(x, y):
        return x.add_(y) + torch.relu(y)  # the partial sum writes x in place

    gm = fx.symbolic_trace(g)
    last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    assert sum_terms(last) is None
