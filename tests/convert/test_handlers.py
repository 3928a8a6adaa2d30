"""Which layer classes convert: exact classes with a handler, nothing else."""

from torch import nn

from lr_quant.convert import convert_with_report


def test_unknown_conv_subclass_is_kept_not_silently_converted():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Doubled(4, 4, 3))
    _, report = convert_with_report(model, {})
    assert report["0"].converted
    assert not report["1"].converted and "unsupported class" in report["1"].reason
    assert type(model[1]) is Doubled


def test_timm_linear_subclass_converted():
    from timm.layers import Linear as TimmLinear
    model = nn.Sequential(TimmLinear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    _, report = convert_with_report(model, {})
    assert [r.target for r in report.layers] == ["LRQuantLinear", "LRQuantLinear"]
