"""``asap model make-tiny`` and ``asap model info`` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.cli import main
from asap.model.checkpoint import CheckpointReader, check_checkpoint
from asap.model.config import load_config


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "olmoe"
    argv = ["model", "make-tiny", "--arch", "olmoe", str(out), "--layers", "2", "--hidden", "32"]
    code = main([*argv, "--experts", "4", "--top-k", "2", "--seed", "3"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = load_config(out)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.top_k) == (
        "olmoe",
        2,
        32,
        4,
        2,
    )
    with CheckpointReader(out) as reader:
        check_checkpoint(reader, cfg)
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    with torch.no_grad():
        assert model(torch.tensor([[7, 8, 9]])).logits.shape == (1, 3, 320)


def test_make_tiny_bad_arguments_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["model", "make-tiny", str(tmp_path / "m"), "--experts", "4", "--top-k", "5"])
    assert code != 0
    assert "top_k=5 exceeds experts=4" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["model", "make-tiny", str(tmp_path / "taken")]) != 0
    assert "not empty" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["model", "make-tiny", "--arch", "llama", str(tmp_path / "l")])
    assert exit_info.value.code != 0
    assert "invalid choice: 'llama'" in capsys.readouterr().err


def test_info_describes_the_built_in_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ASAP_CACHE_DIR", str(tmp_path))
    assert main(["model", "info", "tiny"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["model_type"] == "qwen3_moe"
    assert (lines["layers"], lines["hidden"], lines["experts"], lines["top_k"]) == ("4", "64", "8", "2")
    assert lines["tensors"].startswith("135 stored")
    # embed + lm_head (320x64 each) + final norm + 4 x (attention + q/k norms + router + 8 experts)
    per_layer = 2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 2 * 16 + 8 * 64 + 8 * 3 * 64 * 64
    assert int(lines["params"]) == 2 * 320 * 64 + 64 + 4 * per_layer
    assert lines["tokenizer"] == "259 ids"


def test_info_on_config_only_dir_and_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "make-tiny", "--arch", "mixtral", str(tmp_path / "m"), "--layers", "1"]) == 0
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    capsys.readouterr()
    assert main(["model", "info", str(config_only)]) == 0
    out = capsys.readouterr().out
    assert "model_type: mixtral" in out and "none stored" in out and "tokenizer: none" in out
    assert main(["model", "info", str(tmp_path / "absent")]) != 0
    assert "absent" in capsys.readouterr().err


def test_make_tiny_deepseek_and_its_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    argv = ["model", "make-tiny", "--arch", "deepseek_v3", str(out), "--layers", "3", "--experts", "8"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["model", "info", str(out)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert (lines["model_type"], lines["layers"], lines["moe_layers"]) == ("deepseek_v3", "3", "2")
    assert lines["attention"] == "MLA (q_lora_rank 48, kv_lora_rank 32, qk 16+8, v 16, rope yarn)"
    assert lines["routing"] == "sigmoid, 1 of 2 groups, scaled 2.5"
    with CheckpointReader(out) as reader:
        check_checkpoint(reader, load_config(out))
