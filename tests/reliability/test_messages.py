"""Error messages say what is wrong and what is expected (issue 15: 10)."""

import pytest

from lr_quant.checkpoint import CheckpointError, load_checkpoint
from lr_quant.models import ClassifierReinitWarning, ModelError, create_model


def test_a_directory_as_checkpoint_names_the_expected_file(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"x")
    rc, _, err = cli("eval", run)
    assert rc == 2 and "does not exist" not in err, err
    assert f"{run} is a directory" in err and str(run / "final.safetensors") in err
    assert "(it holds checkpoint.safetensors)" in err


@pytest.mark.parametrize("name, content, what", [
    ("model.onnx", b"\x08\x07\x12\x07pytorch", "is an ONNX model"),
    ("recipe.yaml", b"model:\n  name: resnet10t\n", "is a YAML file"),
    ("weights.pth", b"PK\x03\x04 zip of pickles", "is a PyTorch pickle file"),
    ("notes.txt", b"hello", "is not a safetensors file"),
])
@pytest.mark.parametrize("command", ["eval", "export", "summary"])
def test_a_file_of_another_kind_says_what_it_is(command, name, content, what, tmp_path, cli):
    path = tmp_path / name
    path.write_bytes(content)
    rc, _, err = cli(command, path, *(["--output", tmp_path / "m.onnx"]
                                      if command == "export" else []))
    assert rc == 2 and f"{path} {what}" in err and "not an lr_quant checkpoint" in err, err
    assert "expected a .safetensors file written by lr-quant train" in err
    assert "corrupt" not in err and "older checkpoint" not in err


def test_a_truncated_checkpoint_is_still_called_corrupt(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt or unreadable.*older checkpoint"):
        load_checkpoint(path)


def test_weights_of_another_architecture_name_the_keys(fp_weights, tmp_path, cli):
    with pytest.raises(ModelError) as e:
        create_model("resnet18", 10, pretrained=str(fp_weights))   # fp_weights: resnet10t
    message = str(e.value)
    assert not message.rstrip().endswith(":")
    assert "missing keys conv1.weight" in message and "unexpected keys conv1.0.weight" in message
    rc, _, err = cli("convert", "-c", "quickstart", "--model.name", "resnet18",
                     "--model.checkpoint", fp_weights, "--model.num_classes", "10")
    assert rc == 2 and "missing keys conv1.weight" in err, err


def test_an_unknown_model_name_suggests_close_ones(tmp_path, cli):
    rc, _, err = cli("train", "-c", "quickstart", "--output", tmp_path / "run",
                     "--model.name", "resnet10")
    assert rc == 2 and "unknown timm model 'resnet10'; did you mean resnet10t" in err, err


def test_another_number_of_classes_says_the_classifier_is_reinitialized(fp_weights, cli):
    """Documented choice: the classifier is re-initialized (fine-tuning to a new class set),
    and a warning says so."""
    with pytest.warns(ClassifierReinitWarning, match="has 10 classes, the model 5"):
        model = create_model("resnet10t", 5, pretrained=str(fp_weights))
    assert model.fc.out_features == 5
    rc, out, err = cli("convert", "-c", "quickstart", "--model.checkpoint", fp_weights,
                       "--model.num_classes", "5")
    assert rc == 0, err
    assert ("lr-quant convert: warning: the classifier of "
            f"{fp_weights} has 10 classes, the model 5: the classifier (fc) is re-initialized"
            in err), err
    rc, out, err = cli("convert", "-c", "quickstart", "--model.checkpoint", fp_weights,
                       "--model.num_classes", "10")
    assert rc == 0 and "warning" not in err, err
