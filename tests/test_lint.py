"""Dropout before BatchNorm: the lint rule, the variance-shift measurement and the fixes.

Li et al., CVPR 2019 ("Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift"). The corpus below pins the rule down with exact expected (dropout, victim)
pairs; the zoo tests check that torchvision/timm models, which drop only before the classifier,
lint clean, and that densenet121(drop_rate=0.2), whose dense layers end in F.dropout, does not.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import retrofit
from retrofit.lint import Finding, format_report, lint, measure_variance_shift, recalibrate_bn

# --- the corpus -------------------------------------------------------------------------------


class DropConvBN(nn.Module):
    """dropout → conv → BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn(self.conv(self.drop(F.relu(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


class LinearDropBN1d(nn.Module):
    """linear → dropout → linear → BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.drop(F.relu(self.fc1(x.flatten(1))))
        return self.head(F.relu(self.bn(self.fc2(x))))


class FunctionalDropout(nn.Module):
    """F.dropout(x, p, self.training) in the root's own forward → conv → BN."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = p
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.dropout(F.relu(self.conv1(x)), self.p, self.training)
        x = F.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class ResBlock(nn.Module):
    def __init__(self, c: int, p: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class ResidualDrop(nn.Module):
    """Dropout in block1's branch: reaches block2.bn1 through block2's branch and, through
    block2's skip connection, norm_final — two victims."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block1 = ResBlock(8, 0.2)
        self.block2 = ResBlock(8, 0.0)
        self.norm_final = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.block2(self.block1(x))
        x = F.relu(self.norm_final(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, p: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, features: list[torch.Tensor]):
        x = torch.cat(features, 1)
        return self.drop(self.conv(F.relu(self.norm(x))))


class DenseToy(nn.Module):
    """DenseNet style: each layer's dropped output is concatenated into every later input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = DenseLayer(4, 4, 0.2)
        self.layer2 = DenseLayer(8, 4, 0.2)
        self.norm_final = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        features = [self.stem(x)]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        x = F.relu(self.norm_final(torch.cat(features, 1)))
        return self.fc(x.mean((2, 3)))


class Siblings(nn.Module):
    """The dropout and the BN sit deep in sibling submodules."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.25)), nn.Identity()
        )
        self.decoder = nn.Sequential(nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32)))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(F.relu(self.decoder(self.encoder(x.flatten(1)))))


class TwoIntoOne(nn.Module):
    """Two dropouts feed one BN through an add."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 8, 1)
        self.drop_a = nn.Dropout2d(0.1)
        self.drop_b = nn.Dropout(0.3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn(self.drop_a(self.conv_a(x)) + self.drop_b(self.conv_b(x)))
        return self.fc(F.relu(x).mean((2, 3)))


class Chain(nn.Module):
    """dropout → BN → … → BN: only the first BN is a victim; the second is downstream."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.drop(F.relu(self.conv0(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class DropAfterLastBN(nn.Module):
    """Clean: the only dropout is after the last BN, before the classifier (the fix's shape)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.fc(self.drop(x))


class DropIntoNorm(nn.Module):
    """dropout → conv → ``norm`` → …: clean unless ``norm`` keeps running statistics."""

    def __init__(self, norm: nn.Module, p: float = 0.3):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(p)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = norm
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv1(self.drop(F.relu(self.conv0(x))))
        return self.fc(F.relu(self.norm(x)).mean((2, 3)))


class ChannelsLastLayerNorm(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class EvalOnlyDropout(nn.Module):
    """Clean: a functional dropout with a literal training=False never drops."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(F.dropout(x, 0.5, training=False)))


class FunctionalVariants(nn.Module):
    """F.dropout2d with p as a keyword and torch.dropout, each into its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.conv(x)
        a = self.bn_a(F.dropout2d(x, p=0.1, training=self.training))
        b = self.bn_b(torch.dropout(x, 0.2, self.training))
        return a + b


def _pairs(model: nn.Module) -> set[tuple[str, str]]:
    return {(f.dropout, f.norm) for f in lint(model)}


CORPUS = {
    "dropout_conv_bn": (DropConvBN, {("drop", "bn")}),
    "linear_dropout_linear_bn1d": (LinearDropBN1d, {("drop", "bn")}),
    "functional_dropout": (FunctionalDropout, {("<root>:F.dropout", "bn")}),
    "residual_branch_and_skip": (
        ResidualDrop,
        {("block1.drop", "block2.bn1"), ("block1.drop", "norm_final")},
    ),
    "dense_concat": (
        DenseToy,
        {
            ("layer1.drop", "layer2.norm"),
            ("layer1.drop", "norm_final"),
            ("layer2.drop", "norm_final"),
        },
    ),
    "sibling_submodules": (Siblings, {("encoder.0.2", "decoder.0.1")}),
    "two_dropouts_one_bn": (TwoIntoOne, {("drop_a", "bn"), ("drop_b", "bn")}),
    "bn_chain_first_only": (Chain, {("drop", "bn1")}),
    "functional_variants": (
        FunctionalVariants,
        {("<root>:F.dropout2d", "bn_a"), ("<root>:torch.dropout", "bn_b")},
    ),
    "sync_batchnorm": (lambda: DropIntoNorm(nn.SyncBatchNorm(8)), {("drop", "norm")}),
    "lazy_batchnorm": (lambda: DropIntoNorm(nn.LazyBatchNorm2d()), {("drop", "norm")}),
    "instancenorm_running_stats": (
        lambda: DropIntoNorm(nn.InstanceNorm2d(8, track_running_stats=True)),
        {("drop", "norm")},
    ),
    # Clean cases.
    "dropout_after_last_bn": (DropAfterLastBN, set()),
    "dropout_layernorm": (lambda: DropIntoNorm(ChannelsLastLayerNorm(8)), set()),
    "dropout_groupnorm": (lambda: DropIntoNorm(nn.GroupNorm(2, 8)), set()),
    "bn_without_running_stats": (
        lambda: DropIntoNorm(nn.BatchNorm2d(8, track_running_stats=False)),
        set(),
    ),
    "frozen_batchnorm": (lambda: DropIntoNorm(FrozenBatchNorm2d(8)), set()),
    "instancenorm_no_stats": (lambda: DropIntoNorm(nn.InstanceNorm2d(8)), set()),
    "p_zero": (lambda: DropIntoNorm(nn.BatchNorm2d(8), p=0.0), set()),
    "functional_training_false": (EvalOnlyDropout, set()),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_exact_victims(name):
    factory, expected = CORPUS[name]
    with torch.device("meta"):
        model = factory()
    assert _pairs(model) == expected


def test_timm_batchnormact_is_a_victim():
    from timm.layers import BatchNormAct2d

    with torch.device("meta"):
        model = DropIntoNorm(BatchNormAct2d(8))
    assert _pairs(model) == {("drop", "norm")}


def test_lint_traces_in_training_mode_and_restores_flags():
    # fx bakes self.training into the graph: an eval-mode trace would hide F.dropout(…, self.training).
    with torch.device("meta"):
        model = FunctionalDropout().eval()
    assert _pairs(model) == {("<root>:F.dropout", "bn")}
    assert not any(m.training for m in model.modules())


def test_finding_fields_and_report():
    with torch.device("meta"):
        model = Chain()
    findings = lint(model)
    assert len(findings) == 1
    f = findings[0]
    assert isinstance(f, Finding)
    assert f.path == ["drop", "conv1", "bn1"]
    assert f.source and f.source.endswith(f"test_lint.py:{_line_of(Chain, 'self.drop(')}")
    assert f.p == 0.5 and f.kind == "module" and f.op == "Dropout"
    assert f.downstream == 1  # bn2: the shift carries on past the victim
    d = f.to_dict()
    assert {"dropout", "norm", "path", "source", "downstream", "hint"} <= set(d)
    assert d["dropout"] == "drop" and d["norm"] == "bn1" and "uout" in d["hint"]
    report = format_report(findings)
    assert "drop" in report and "bn1" in report and "drop → conv1 → bn1" in report
    assert "test_lint.py:" in report and "after_last_bn" in report and "Li et al." in report
    assert retrofit.lint(model)[0] == f  # the package-level name is the function


def _line_of(cls: type, text: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_clean_report_counts_dropouts():
    with torch.device("meta"):
        findings = lint(DropAfterLastBN())
    assert findings == [] and findings.dropouts == ["drop"]
    assert format_report(findings).startswith("clean")


def test_include_structured_option():
    class DropPathIntoBN(nn.Module):
        def __init__(self):
            super().__init__()
            from timm.layers import DropPath

            self.conv = nn.Conv2d(3, 8, 1)
            self.dp = DropPath(0.1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(x.mean(1, keepdim=True) + self.dp(self.conv(x)))

    with torch.device("meta"):
        model = DropPathIntoBN()
    assert lint(model) == []
    assert {(f.dropout, f.norm) for f in lint(model, include_structured=True)} == {("dp", "bn")}


def test_dropouts_inside_an_opaque_leaf():
    # nn.TransformerEncoderLayer is a torch.nn leaf for fx: its dropouts are not graph nodes,
    # so its output is the site, and each inner dropout is named.
    class EncoderThenBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(self.enc(x).transpose(1, 2))

    with torch.device("meta"):
        findings = lint(EncoderThenBN())
    assert {(f.dropout, f.norm, f.kind) for f in findings} == {
        ("enc.dropout", "bn", "inside"),
        ("enc.dropout1", "bn", "inside"),
        ("enc.dropout2", "bn", "inside"),
        ("enc.self_attn", "bn", "inside"),
    }


def test_untraceable_forward_is_reported_not_guessed():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Dropout(0.3))
            self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

        def forward(self, x):
            x = self.a(x)
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this forward
                x = x * 2
            return self.b(x)

    findings = lint(DataDependent())
    assert findings == []  # the path a → b runs through code fx could not read
    assert any(n.startswith("<root> was not traced") for n in findings.notes)
    assert any(n.startswith("a.1: its output leaves a") for n in findings.notes)
    assert "not checked: a.1" in format_report(findings)


# --- the zoo ----------------------------------------------------------------------------------


def _meta(spec: str, **kwargs) -> nn.Module:
    from retrofit.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init-weights FutureWarnings
        model, _ = create_model(spec, kwargs=kwargs, meta=True)
    return model


def test_densenet121_flagged_at_the_right_bns():
    model = _meta("tv:densenet121", drop_rate=0.2)
    findings = lint(model)
    # Dense layer i's F.dropout reaches norm1 of every later layer of its block (concatenated
    # into their input) and the block's exit BN (transition norm, or norm5 after block 4):
    # n(n+1)/2 pairs for a block of n layers.
    assert len(findings) == sum(n * (n + 1) // 2 for n in (6, 12, 24, 16))
    assert len({f.dropout for f in findings}) == 58
    first = {f.norm for f in findings if f.dropout == "features.denseblock1.denselayer1:F.dropout"}
    assert first == {f"features.denseblock1.denselayer{i}.norm1" for i in range(2, 7)} | {
        "features.transition1.norm"
    }
    last = [f for f in findings if f.dropout == "features.denseblock4.denselayer16:F.dropout"]
    assert [f.norm for f in last] == ["features.norm5"]
    f = findings[0]
    assert f.kind == "function" and f.op == "F.dropout" and f.p == 0.2
    assert f.source.endswith("torchvision/models/densenet.py:" + f.source.rsplit(":", 1)[1])
    assert f.path[1] == "features.denseblock1.denselayer2:cat"
    # norm2 of a layer is never a victim: conv1 and norm1 sit between it and any dropout.
    assert not any(f.norm.endswith("norm2") for f in findings)


FAST_TV = [
    "densenet121",
    "resnet50",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "vgg16_bn",
    "googlenet",
    "inception_v3",
    "squeezenet1_0",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "maxvit_t",
]


@pytest.mark.parametrize("name", FAST_TV)
def test_torchvision_sample_lints_clean(name):
    findings = lint(_meta(f"tv:{name}"))
    assert findings == [] and findings.notes == []


def _tv_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


@pytest.mark.slow
def test_every_torchvision_classification_model_lints_clean():
    # 20-60 s: the RegNets' constructors need real tensors, so they are built on the CPU.
    dirty = {}
    for name in _tv_names():
        findings = lint(_meta(f"tv:{name}"))
        if findings or findings.notes:
            dirty[name] = [(f.dropout, f.norm) for f in findings] + findings.notes
    assert dirty == {}


TIMM_SAMPLE = [
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "densenet121",
    "convnext_atto",
    "regnetx_002",
    "vit_tiny_patch16_224",
    "levit_128s",
    "ghostnet_100",
    "dla34",
    "rexnet_100",
    "cspresnet50",
]


@pytest.mark.parametrize("drop_rate", [None, 0.3])
@pytest.mark.parametrize("name", TIMM_SAMPLE)
def test_timm_sample_lints_clean(name, drop_rate):
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    findings = lint(_meta(f"timm:{name}", **kwargs))
    assert findings == []


# Not every timm model is clean. A sweep of the first model of each of timm's 98 model modules,
# with default arguments and with drop_rate=0.3, flags exactly these — each a real Dropout →
# BatchNorm path in timm's code, not a false positive:
TIMM_TRUE_POSITIVES = {
    # BatNonLocalAttn ends in Dropout2d(0.2) by default; conv3_1x1's BN follows the residual add.
    ("bat_resnext26ts", None): ("stages.0.0.attn.dropout", "stages.0.0.conv3_1x1.bn"),
    # The MLP's Dropout(0.1) (default) reaches the next block's BN through the residual add.
    ("cpubone_b0_bfrobust", None): (
        "stages.2.1.total.0.1.main.4",
        "stages.2.1.total.1.main.spatial_conv.norm",
    ),
    # The classifier itself starts with BatchNorm1d (NormLinear/BN_Linear): head_drop is before it.
    ("repvit_m0_9", 0.3): ("head_drop", "head.head.bn"),
    ("iformer_t", 0.3): ("head_drop", "head.head.bn"),
    ("shvit_s1", 0.3): ("<root>:F.dropout", "head.bn"),
}


@pytest.mark.parametrize("case", list(TIMM_TRUE_POSITIVES))
def test_timm_true_positives(case):
    name, drop_rate = case
    kwargs = {} if drop_rate is None else {"drop_rate": drop_rate}
    findings = lint(_meta(f"timm:{name}", **kwargs))
    assert (findings[0].dropout, findings[0].norm) == TIMM_TRUE_POSITIVES[case]


# --- measurement and recalibration on a trained toy -------------------------------------------


class DigitsMLP(nn.Module):
    """Linear → ReLU → Dropout(0.5) → Linear → BN1d → ReLU → Linear: the bug on 8×8 digits."""

    def __init__(self, p: float = 0.5, width: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.drop(F.relu(self.fc1(x)))
        return self.head(F.relu(self.bn(self.fc2(x))))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return x, y


@pytest.fixture(scope="module")
def trained(digits):
    x, y = digits
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP: extra threads only add contention (8x slower)
    try:
        for _ in range(300):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _batches(x: torch.Tensor, size: int = 128) -> list[tuple[torch.Tensor, None]]:
    # Equal batches (1792 of the 1797 digits): the cumulative average weighs batches, not rows.
    x = x[: len(x) // size * size]
    return [(x[i : i + size], None) for i in range(0, len(x), size)]


def test_measure_shows_shift_and_recalibration_removes_it(trained, digits):
    x, _ = digits
    batches = _batches(x)
    before_state = copy.deepcopy(trained.state_dict())
    filled = measure_variance_shift(trained, batches)  # re-estimate with dropout on, as training
    as_trained = measure_variance_shift(trained, batches, fill=False)
    assert set(filled) == set(as_trained) == {"bn"}
    assert filled["bn"] > 1.3 and as_trained["bn"] > 1.3  # a clear shift
    assert measure_variance_shift(trained, batches) == filled  # seeded: reproducible
    # Measuring works on a copy: the model is untouched.
    for k, v in trained.state_dict().items():
        assert torch.equal(v, before_state[k]), k

    fixed = recalibrate_bn(copy.deepcopy(trained), batches)
    after = measure_variance_shift(fixed, batches, fill=False)
    assert after["bn"] < 1.05
    assert after["bn"] - 1 < (as_trained["bn"] - 1) / 5  # much smaller
    report = format_report(lint(trained), filled)
    assert "shift ×" in report


def test_recalibrate_changes_only_running_stats(trained, digits):
    x, y = digits
    model = copy.deepcopy(trained).train()
    params = {k: v.clone() for k, v in model.named_parameters()}
    momentum = model.bn.momentum
    out = recalibrate_bn(model, _batches(x))
    assert out is model
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    assert model.training and model.drop.training  # flags restored
    assert model.bn.momentum == momentum
    assert model.bn.num_batches_tracked.item() == len(_batches(x))
    # BN statistics now match what eval mode (dropout off) feeds it.
    with torch.no_grad():
        h = model.fc2(F.relu(model.fc1(x[:1792])))
    torch.testing.assert_close(model.bn.running_mean, h.mean(0), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        acc_before = (trained(x).argmax(1) == y).float().mean()
        acc_after = (model.eval()(x).argmax(1) == y).float().mean()
    assert acc_after >= acc_before - 0.01


def test_recalibrate_with_no_batches_keeps_the_old_statistics(trained):
    model = copy.deepcopy(trained)
    running_var = model.bn.running_var.clone()
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(model, [])
    assert torch.equal(model.bn.running_var, running_var)


def test_recalibrate_turns_functional_dropout_off():
    torch.manual_seed(0)
    model = FunctionalDropout(p=0.9)
    x = torch.randn(16, 3, 8, 8)
    recalibrate_bn(model, [x])
    # With F.dropout(…, self.training) off, BN saw exactly conv2(relu(conv1(x))).
    with torch.no_grad():
        h = model.conv2(F.relu(model.conv1(x)))
    torch.testing.assert_close(model.bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_measure_needs_real_weights():
    with torch.device("meta"):
        model = DropConvBN()
    with pytest.raises(ValueError, match="meta"):
        measure_variance_shift(model)


# --- the recipe fixes -------------------------------------------------------------------------


FIXABLE = {
    "dropout_conv_bn": (DropConvBN, (2, 3, 8, 8)),
    "linear_bn1d": (LinearDropBN1d, (4, 64)),
    "functional_in_root": (FunctionalDropout, (2, 3, 8, 8)),
    "residual": (ResidualDrop, (2, 3, 8, 8)),
    "dense": (DenseToy, (2, 3, 8, 8)),
    "siblings": (Siblings, (4, 64)),
    "two_into_one": (TwoIntoOne, (2, 3, 8, 8)),
}


def _trained_stats(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Non-trivial running statistics, so that equal eval outputs mean something."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


@pytest.mark.parametrize("recipe", [{"uout": {"beta": 0.1}}, {"dropout_fix": "after_last_bn"}])
@pytest.mark.parametrize("name", list(FIXABLE))
def test_fixes_make_lint_clean_and_keep_eval_output(name, recipe):
    factory, shape = FIXABLE[name]
    torch.manual_seed(0)
    model = _trained_stats(factory(), shape)
    x = torch.randn(*shape)
    with torch.no_grad():
        reference = model(x)
    keys = set(model.state_dict())
    assert lint(model)
    retrofit.apply(model, recipe, example_input=x)  # verify=True: eval output checked
    assert lint(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference)
    assert set(model.state_dict()) == keys
    retrofit.strip(model)
    assert _pairs(model) == CORPUS_PAIRS[name]


CORPUS_PAIRS = {
    "dropout_conv_bn": CORPUS["dropout_conv_bn"][1],
    "linear_bn1d": CORPUS["linear_dropout_linear_bn1d"][1],
    "functional_in_root": CORPUS["functional_dropout"][1],
    "residual": CORPUS["residual_branch_and_skip"][1],
    "dense": CORPUS["dense_concat"][1],
    "siblings": CORPUS["sibling_submodules"][1],
    "two_into_one": CORPUS["two_dropouts_one_bn"][1],
}


def test_uout_plan_replaces_modules_and_calls():
    with torch.device("meta"):
        plan = retrofit.plan(FunctionalVariants(), {"uout": {"beta": 0.2}})
    assert [(e.kind, e.action, e.params["beta"]) for e in plan.edits] == [
        ("uout", "replace_call", 0.2),
        ("uout", "replace_call", 0.2),
    ]
    with torch.device("meta"):
        plan = retrofit.plan(TwoIntoOne(), {"uout": {}})
    assert {(e.action, e.target) for e in plan.edits} == {
        ("replace_module", "drop_a"),
        ("replace_module", "drop_b"),
    }


def test_uout_layer_is_the_paper_formula():
    torch.manual_seed(0)
    model = DropConvBN()
    retrofit.apply(model, {"uout": {"beta": 0.1}}, example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(model.drop, retrofit.layers.Uout) and model.drop.beta == 0.1
    model.train()
    x = torch.ones(1000)
    y = model.drop(x)
    assert y.min() >= 0.9 and y.max() <= 1.1 and y.std() > 0.01  # y = x + x·r, r ~ U(−β, β)


def test_after_last_bn_plan_places_one_dropout_before_the_classifier():
    with torch.device("meta"):
        model = TwoIntoOne()
        plan = retrofit.plan(model, {"dropout_fix": "after_last_bn"})
    roles = [(e.action, e.params["role"], e.params.get("p")) for e in plan.edits]
    assert roles == [
        ("replace_module", "remove", None),
        ("replace_module", "remove", None),
        ("wrap_arg", "insert", 0.3),  # the larger p of the two removed dropouts
    ]
    insert = plan.edits[-1]
    assert insert.module == "" and insert.node == "fc" and insert.arg == 0
    assert "largest" in insert.note


def test_after_last_bn_reuses_an_empty_head_slot():
    class Slot(DropAfterLastBN):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.0)  # timm's head_drop with drop_rate=0
            self.drop0 = nn.Dropout(0.4)

        def forward(self, x):
            x = self.drop0(self.conv(x))
            x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)
            return self.fc(self.drop(x))

    with torch.device("meta"):
        plan = retrofit.plan(Slot(), {"dropout_fix": "after_last_bn"})
    assert [(e.action, e.target, e.params["role"]) for e in plan.edits] == [
        ("replace_module", "drop0", "remove"),
        ("replace_module", "drop", "insert"),
    ]
    torch.manual_seed(0)
    model = _trained_stats(Slot(), (2, 3, 8, 8))
    retrofit.apply(model, {"dropout_fix": "after_last_bn"}, example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(model.drop0, nn.Identity) and model.drop.p == 0.4
    assert lint(model) == [] and lint(model).dropouts == ["drop"]


def test_after_last_bn_without_a_place_says_so():
    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.drop = nn.Dropout(0.3)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.drop(self.conv(x)))  # ends in a BN: nowhere after it

    with torch.device("meta"):
        plan = retrofit.plan(NoHead(), {"dropout_fix": "after_last_bn"})
    assert [e.params["role"] for e in plan.edits] == ["remove"]
    assert "no place after the last BN" in plan.edits[0].note


def test_densenet_fixes_plan_every_flagged_dropout():
    model = _meta("tv:densenet121", drop_rate=0.2)
    plan = retrofit.plan(model, {"dropout_fix": "after_last_bn"})
    removes = [e for e in plan.edits if e.params["role"] == "remove"]
    inserts = [e for e in plan.edits if e.params["role"] == "insert"]
    assert len(removes) == 58 and all(e.action == "replace_call" for e in removes)
    assert len(inserts) == 1 and inserts[0].node == "classifier" and inserts[0].params["p"] == 0.2
    plan = retrofit.plan(model, {"uout": {"beta": 0.1}})
    assert len(plan.by_kind("uout")) == 58


def test_import_names_for_the_cli():
    import importlib

    module = importlib.import_module("retrofit.lint")  # ``retrofit.lint`` is the function
    for name in ("lint", "format_report", "measure_variance_shift", "Finding", "recalibrate_bn"):
        assert hasattr(module, name)
    assert retrofit.Finding is Finding and retrofit.recalibrate_bn is recalibrate_bn
    assert callable(retrofit.lint)
