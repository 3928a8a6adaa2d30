"""FINN's verdict from the command line on a network FINN cannot map: the quick start's
resnet10t keeps its first conv and classifier float, so `lr-quant export --finn` must say
"not mapped" with FINN's reason and exit 1, and `lr-quant summary --finn` must keep the
conservative "no" rows and print the same verdict."""

import pytest

from lr_quant.cli import main


@pytest.mark.slow
def test_a_network_finn_cannot_map_gets_not_mapped_with_the_reason(tmp_path, capsys):
    run = tmp_path / "run"   # a narrow resnet10t (FINN's time grows with the widths)
    assert main(["train", "-c", "quickstart", "--output", str(run),
                 "--set", "model.kwargs={stem_width: 8, channels: [8, 8, 8, 8]}",
                 "--train.epochs", "1", "--data.train_fraction", "0.15",
                 "--train.batch_size", "32", "--train.sampled_networks", "0",
                 "--train.bn_reestimate_batches", "2", "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["export", str(run / "final.safetensors"), "--output", str(tmp_path / "m.onnx"),
               "--finn"])
    stdout = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in stdout.splitlines() if ln.startswith("FINN (finn-plus"))
    assert line.startswith("FINN (finn-plus build steps): not mapped: ") and len(line) > 60

    rc = main(["summary", str(run / "checkpoint.safetensors"), "--finn"])
    assert rc == 2 and "give final.safetensors" in capsys.readouterr().err
    assert main(["summary", str(run / "final.safetensors"), "--finn"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1] == line   # the same verdict
    first_conv = next(row for row in table if row.startswith("conv1.0 "))
    assert first_conv.rstrip().endswith("no: float weights")
