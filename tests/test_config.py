"""Config validation and precedence (flag > config > default) through `read_config` and `load_settings`.

No torch here: config handling must work (and fail) without importing it.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import one_line

from gradcam_cli.config import Settings, load_settings, read_config
from gradcam_cli.errors import GradcamError


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- defaults -----------------------------------------------------------------------------------------------


def test_defaults_without_config_or_flags() -> None:
    s = load_settings()
    assert s == Settings()
    assert s.method == "gradcam"
    assert s.targets == ("pred",)
    assert s.target_layers == ()
    assert s.batch_size == 16
    assert s.device == "auto"
    assert s.workers == 2
    assert s.save == ("heatmap", "overlay")
    assert s.colormap == "jet"
    assert s.alpha == 0.5
    assert s.preprocess == "full"
    assert s.limit is None
    assert s.quiet is False


def test_flags_given_as_none_mean_not_given() -> None:
    s = load_settings(None, batch_size=None, targets=None, target_layers=None, device=None, quiet=None)
    assert s == Settings()


def test_empty_config_file_is_all_defaults(tmp_path: Path) -> None:
    empty = _write(tmp_path, "")
    comments = _write(tmp_path, "# nothing but a comment\n", name="comments.yaml")
    assert read_config(empty) == {}
    assert read_config(comments) == {}
    assert load_settings(empty) == Settings()


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch_size = 3  # type: ignore[misc]


# --- reading and normalising a config -----------------------------------------------------------------------


def test_read_config_validates_and_normalises_every_key(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        """
        model: resnet18
        weights: none
        target_layers: layer4[-1]
        method: GradCAM
        targets: TopK:3
        batch_size: 4
        device: CUDA:1
        workers: 0
        save: npy, heatmap
        colormap: viridis
        alpha: 1
        preprocess: CROP
        input_size: 64
        mean: [0.5, 0.5, 0.5]
        std: [1, 1, 1]
        model_kwargs: {num_classes: 10}
        limit: 3
        quiet: true
        """,
    )
    data = read_config(cfg)
    assert data == {
        "model": "resnet18",
        "weights": "none",
        "target_layers": ("layer4[-1]",),
        "method": "gradcam",
        "targets": ("topk:3",),
        "batch_size": 4,
        "device": "cuda:1",
        "workers": 0,
        "save": ("heatmap", "npy"),  # canonical order, whatever order was written
        "colormap": "viridis",
        "alpha": 1.0,
        "preprocess": "crop",
        "input_size": (64, 64),
        "mean": (0.5, 0.5, 0.5),
        "std": (1.0, 1.0, 1.0),
        "model_kwargs": {"num_classes": 10},
        "limit": 3,
        "quiet": True,
    }
    assert isinstance(data["alpha"], float)
    s = load_settings(cfg)
    assert s.input_size == (64, 64)
    assert s.target_layers == ("layer4[-1]",)


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("pred", ("pred",)),
        ("5", ("5",)),
        ("[pred, 5, tabby]", ("pred", "5", "tabby")),
        ("'pred,topk:2'", ("pred", "topk:2")),
        ("PRED", ("pred",)),
    ],
)
def test_targets_spellings(tmp_path: Path, yaml_value: str, expected: tuple[str, ...]) -> None:
    cfg = _write(tmp_path, f"targets: {yaml_value}\n")
    assert load_settings(cfg).targets == expected


def test_layers_as_list_and_input_size_as_pair(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "target_layers: [layer3, 'layer4.-1']\ninput_size: [64, 96]\n")
    s = load_settings(cfg)
    assert s.target_layers == ("layer3", "layer4.-1")
    assert s.input_size == (64, 96)


def test_relative_labels_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = _write(sub, "labels: names.txt\n")
    assert Path(load_settings(cfg).labels or "") == sub / "names.txt"
    absolute = tmp_path / "elsewhere" / "names.txt"
    cfg2 = _write(sub, f"labels: '{absolute}'\n", name="abs.yaml")
    assert Path(load_settings(cfg2).labels or "") == absolute


def test_null_values_for_optional_keys(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "model: null\nweights: ~\nlimit: null\ninput_size: null\n")
    s = load_settings(cfg)
    assert (s.model, s.weights, s.limit, s.input_size) == (None, None, None, None)


# --- precedence ---------------------------------------------------------------------------------------------


def test_flag_beats_config_beats_default(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        """
        model: resnet50
        batch_size: 4
        targets: topk:2
        target_layers: layer3
        save: [heatmap]
        alpha: 0.25
        """,
    )
    s = load_settings(cfg, model="resnet18", targets=["pred"], target_layers=["layer4"], workers=None, alpha=None)
    # flags win
    assert s.model == "resnet18"
    assert s.targets == ("pred",)
    assert s.target_layers == ("layer4",)
    # config beats default where no flag was given (None = not given)
    assert s.batch_size == 4
    assert s.save == ("heatmap",)
    assert s.alpha == 0.25
    # default where neither says anything
    assert s.workers == 2
    assert s.colormap == "jet"
    assert s.method == "gradcam"


def test_flag_equal_to_default_still_beats_config(tmp_path: Path) -> None:
    # a flag that happens to equal the default must still override the config value
    cfg = _write(tmp_path, "batch_size: 4\ndevice: cpu\nworkers: 0\n")
    s = load_settings(cfg, batch_size=16, device="auto", workers=2)
    assert (s.batch_size, s.device, s.workers) == (16, "auto", 2)


def test_flags_are_validated_like_config_values() -> None:
    s = load_settings(None, save="npy,HEATMAP", method="GRADCAM", targets=["TopK:3"], device="CPU")
    assert s.save == ("heatmap", "npy")
    assert s.method == "gradcam"
    assert s.targets == ("topk:3",)
    assert s.device == "cpu"


def test_replace_validates_too() -> None:
    s = Settings().replace(batch_size=2, save="heatmap")
    assert (s.batch_size, s.save) == (2, ("heatmap",))
    with pytest.raises(GradcamError, match="batch_size"):
        Settings().replace(batch_size=0)


# --- errors -------------------------------------------------------------------------------------------------


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "batch_sise: 4\n")
    with pytest.raises(GradcamError) as exc:
        read_config(cfg)
    message = one_line(exc)
    assert "'batch_sise'" in message
    assert "batch_size" in message  # the suggestion
    with pytest.raises(GradcamError):
        load_settings(cfg)


def test_unknown_key_without_near_match_still_lists_valid_keys(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "zzzz: 1\n")
    with pytest.raises(GradcamError) as exc:
        read_config(cfg)
    message = one_line(exc)
    assert "'zzzz'" in message
    assert "batch_size" in message and "targets" in message


def test_unknown_flag_keyword_is_an_error() -> None:
    with pytest.raises(GradcamError, match="bogus"):
        load_settings(None, bogus=1)


@pytest.mark.parametrize(
    ("key", "yaml_value"),
    [
        ("batch_size", "'16'"),  # a string, not an int
        ("batch_size", "0"),
        ("batch_size", "-3"),
        ("batch_size", "true"),  # bool is not an int here
        ("batch_size", "2.5"),
        ("workers", "-1"),
        ("workers", "two"),
        ("limit", "0"),
        ("alpha", "1.5"),
        ("alpha", "-0.1"),
        ("alpha", "high"),
        ("alpha", "true"),
        ("device", "gpu"),
        ("device", "cuda:x"),
        ("device", "3"),
        ("method", "gradcam++"),  # not a method name (gradcampp is)
        ("method", "[gradcam]"),
        ("colormap", "rainbowish"),
        ("preprocess", "stretch"),
        ("save", "heatmap,foo"),
        ("save", "{a: 1}"),
        ("targets", "topk:0"),
        ("targets", "topk"),
        ("targets", "'-1'"),
        ("targets", "[]"),
        ("targets", "{a: 1}"),
        ("target_layers", "3"),
        ("target_layers", "['']"),
        ("target_layers", "{layer4: 1}"),
        ("input_size", "4"),
        ("input_size", "[64]"),
        ("input_size", "[64, 64, 3]"),
        ("input_size", "big"),
        ("mean", "[0.5, 0.5]"),
        ("mean", "0.5"),
        ("std", "[a, b, c]"),
        ("model_kwargs", "[1, 2]"),
        ("quiet", "'maybe'"),
        ("quiet", "1"),
        ("model", "''"),
        ("model", "[resnet18]"),
        ("weights", "5"),
        ("labels", "[a, b]"),
        # method options and ground truth
        ("fuse", "avg"),
        ("fuse", "true"),
        ("chunk_size", "0"),
        ("chunk_size", "'32'"),
        ("counterfactual", "'yes'"),
        ("aug_smooth", "1"),
        ("eigen_smooth", "on-ish"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, key: str, yaml_value: str) -> None:
    cfg = _write(tmp_path, f"{key}: {yaml_value}\n")
    with pytest.raises(GradcamError) as exc:
        load_settings(cfg)
    message = one_line(exc)
    assert f"config key '{key}'" in message, message
    assert "expected" in message


def test_wrong_flag_value_names_the_option() -> None:
    with pytest.raises(GradcamError) as exc:
        load_settings(None, batch_size=0)
    message = one_line(exc)
    assert "batch_size" in message or "--batch-size" in message
    with pytest.raises(GradcamError, match=r"alpha|--alpha"):
        load_settings(None, alpha=3.0)


def test_invalid_config_value_fails_even_when_a_flag_overrides_it(tmp_path: Path) -> None:
    # the file is validated as a whole: a broken config is reported, not silently masked by a flag
    cfg = _write(tmp_path, "batch_size: zero\n")
    with pytest.raises(GradcamError, match="config key 'batch_size'"):
        load_settings(cfg, batch_size=8)


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "model: resnet18\nsave: [heatmap, overlay\nalpha: 0.5\n")
    with pytest.raises(GradcamError) as exc:
        read_config(cfg)
    message = one_line(exc)
    assert str(cfg) in message
    assert "line" in message


@pytest.mark.parametrize("text", ["- model\n- resnet18\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    cfg = _write(tmp_path, text)
    with pytest.raises(GradcamError) as exc:
        read_config(cfg)
    assert "mapping" in one_line(exc)


def test_missing_and_binary_config_files(tmp_path: Path) -> None:
    with pytest.raises(GradcamError) as exc:
        read_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in one_line(exc)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 model: x")
    with pytest.raises(GradcamError) as exc2:
        read_config(binary)
    assert "binary.yaml" in one_line(exc2)


def test_unsafe_yaml_tags_are_rejected(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(GradcamError):
        read_config(cfg)


def test_config_handling_never_imports_torch(tmp_path: Path) -> None:
    good = _write(tmp_path, "model: resnet18\nbatch_size: 2\n")
    bad = _write(tmp_path, "batch_sise: 2\n", name="bad.yaml")
    code = textwrap.dedent(
        f"""
        import sys
        from gradcam_cli.config import load_settings
        from gradcam_cli.errors import GradcamError
        assert load_settings({str(good)!r}, workers=0).batch_size == 2
        try:
            load_settings({str(bad)!r})
        except GradcamError:
            pass
        else:
            raise SystemExit("bad config accepted")
        print("torch" in sys.modules, "torchvision" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


# --- methods, smoothing, fusion, ground truth --------------------------------------------------------------


def test_method_option_keys(tmp_path: Path) -> None:
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = _write(
        sub,
        """\
        method: GuIded-GradCAM
        targets: [label, pred]
        counterfactual: true
        aug_smooth: true
        eigen_smooth: false
        chunk_size: 8
        fuse: MAX
        """,
    )
    s = load_settings(cfg)
    assert (s.method, s.targets, s.fuse, s.chunk_size) == ("guided-gradcam", ("label", "pred"), "max", 8)
    assert (s.counterfactual, s.aug_smooth, s.eigen_smooth) == (True, True, False)
    defaults = Settings()
    assert (defaults.counterfactual, defaults.aug_smooth, defaults.eigen_smooth) == (False, False, False)
    assert (defaults.fuse, defaults.chunk_size) == ("none", 32)
    # flags win over the config, as for every key
    assert load_settings(cfg, fuse="mean", counterfactual=False).fuse == "mean"
    assert load_settings(cfg, counterfactual=False).counterfactual is False


def test_method_names_match_the_cli_choices() -> None:
    from gradcam_cli.cli import explain
    from gradcam_cli.config import METHOD_NAMES

    (method_option,) = [p for p in explain.params if p.name == "method"]
    assert tuple(method_option.type.choices) == METHOD_NAMES  # type: ignore[attr-defined]


@pytest.mark.parametrize(("yaml_value", "expected"), [("auto", None), ("AUTO", None), ("null", None), ("true", True)])
def test_channels_last_is_true_false_or_auto(tmp_path: Path, yaml_value: str, expected: bool | None) -> None:
    assert load_settings(_write(tmp_path, f"channels_last: {yaml_value}\n")).channels_last is expected
    assert Settings().channels_last is None  # auto: the run decides by device


def test_channels_last_other_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(GradcamError) as exc:
        load_settings(_write(tmp_path, "channels_last: sometimes\n"))
    message = one_line(exc)
    assert "channels_last" in message and "true, false or auto" in message
