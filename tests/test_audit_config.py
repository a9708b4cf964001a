"""Config keys of the audit options: validated like every other key (one line naming the key), paths in a
config relative to the config file, flags over config, and gate parsing (KEY=VALUE, mappings, percentages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradcam_cli.config import Settings, load_settings, read_config
from gradcam_cli.errors import GradcamError


def test_defaults() -> None:
    s = Settings()
    assert s.metrics == () and s.steps == 20 and s.baseline == "blur" and s.metric_batch_size is None
    assert s.boxes is None and s.masks is None and s.summary is False and s.truth == "auto" and s.worst == 10
    assert s.fail_under == () and s.fail_over == () and s.only_below is None and s.sample_rate is None


def test_config_keys_are_read_and_normalised(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "audit.yaml"
    cfg.write_text(
        "metrics: [Pointing, deletion]\nsteps: 10\nbaseline: ZERO\nmetric_batch_size: 32\nboxes: boxes.csv\n"
        "masks: ../masks\nsummary: true\ntruth: folders\nworst: 3\n"
        "fail_under: {pointing: 0.8, accuracy: 90%}\nfail_over: [deletion=0.25]\nonly_below: 0.6\nsample_rate: 5%\n",
        encoding="utf-8",
    )
    s = load_settings(cfg)
    assert s.metrics == ("deletion", "pointing")  # canonical order, as the CSV columns
    assert (s.steps, s.baseline, s.metric_batch_size) == (10, "zero", 32)
    assert (s.summary, s.truth, s.worst) == (True, "folders", 3)
    assert s.boxes == str(tmp_path / "sub" / "boxes.csv")  # relative to the config file
    assert s.masks == str(tmp_path / "sub" / ".." / "masks")
    assert s.fail_under == (("accuracy", 0.9), ("pointing", 0.8))
    assert s.fail_over == (("deletion", 0.25),)
    assert s.only_below == 0.6 and s.sample_rate == pytest.approx(0.05)
    # a truth file is relative to the config too; the keywords are not paths
    cfg.write_text("truth: labels.csv\n", encoding="utf-8")
    assert read_config(cfg)["truth"] == str(tmp_path / "sub" / "labels.csv")


def test_flags_override_and_gates_accumulate_from_repeated_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fail_under: {pointing: 0.8}\nsteps: 10\n", encoding="utf-8")
    s = load_settings(cfg, fail_under=["energy=0.5", "insertion=0.3", "energy=0.6"], steps=5)
    assert s.fail_under == (("energy", 0.6), ("insertion", 0.3))  # the flag replaces the config; last one wins
    assert s.steps == 5


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("metrics", "speed", "subset of deletion,insertion,drop,pointing,energy"),
        ("steps", 1, "from 2 to 1000"),
        ("steps", 5000, "from 2 to 1000"),
        ("baseline", "noise", "blur, zero, mean"),
        ("metric_batch_size", 0, "positive integer"),
        ("summary", "yes", "true or false"),
        ("truth", "", "auto, folders, none or a CSV"),
        ("worst", -1, "integer >= 0"),
        ("fail_under", "deletion=0.2", "accuracy, insertion, increase, pointing, energy"),
        ("fail_over", "pointing=0.2", "deletion, drop"),
        ("fail_under", "pointing", "KEY=VALUE"),
        ("fail_under", "pointing=nan", "KEY=VALUE"),
        ("only_below", 0, "greater than 0 and at most 1"),
        ("only_below", "1.5", "greater than 0 and at most 1"),
        ("sample_rate", True, "greater than 0 and at most 1"),
        ("boxes", "", "non-empty string"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: object, needle: str) -> None:
    with pytest.raises(GradcamError) as exc:
        load_settings(None, **{key: value})
    message = str(exc.value)
    assert "option --" + key.replace("_", "-") in message and needle in message and "\n" not in message
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({key: value}), encoding="utf-8")
    with pytest.raises(GradcamError, match=f"config key '{key}'"):
        load_settings(cfg)
