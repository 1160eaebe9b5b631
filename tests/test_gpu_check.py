"""benchmarks/gpu_check.py: its CPU smoke mode runs end to end (so the GPU check cannot rot), and its
MFU arithmetic, peak table and parameter count are right."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it imports only torch at the top)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_cpu_smoke_reports_sane_figures(tmp_path, gpu_check):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["errors"] == []
    assert report["peak_bf16_flops"] is None and "MFU n/a" in report["peak_note"]
    assert report["environment"]["device"] == "cpu" and report["environment"]["transformers"]
    assert [m["name"] for m in report["models"]] == list(gpu_check.SMOKE_MODELS)
    work = report["workload"]
    for model in report["models"]:
        spec = gpu_check.ModelSpec(**model["config"])
        assert model["params"] == gpu_check.qwen3_parameter_count(spec)
        assert list(model["phases"]) == list(gpu_check.PHASES)
        for name in ("train_padded", "train_packed"):
            phase = model["phases"][name]
            assert phase["packing"] == (name == "train_packed")
            assert phase["gradient_checkpointing"] == spec.gradient_checkpointing
            assert phase["timed_steps"] == 2 and len(phase["step_s"]) == 2
            assert _positive(phase["tokens_per_s"]) and _positive(phase["mean_step_s"])
            assert phase["tokens_per_s"] == pytest.approx(phase["tokens_per_step"] / phase["mean_step_s"])
            assert work["min_len"] * work["episodes"] <= phase["tokens_per_step"] <= work["max_len"] * work["episodes"]
            assert 0 < phase["loss_tokens_per_step"] < phase["tokens_per_step"] <= phase["padded_tokens_per_step"]
            assert phase["mfu"] is None and phase["mfu_6n"] is None and phase["peak_memory_gib"] is None
            assert math.isfinite(phase["last_loss"]) and math.isfinite(phase["last_grad_norm"])
            dense, _ = gpu_check.training_flops(model["params"], spec, [phase["tokens_per_step"]])
            assert phase["model_tflop_per_step_6n"] == pytest.approx(dense / 1e12)
        for name, dtype in (("generate_float32", "float32"), ("generate_bfloat16", "bfloat16")):
            phase = model["phases"][name]
            assert phase["dtype"] == dtype and phase["batch"] == work["gen_batch"]
            assert _positive(phase["decode_tokens_per_s"]) and _positive(phase["prefill_tokens_per_s"])
            assert 0 < phase["decoded_tokens"] <= work["gen_batch"] * (phase["new_tokens_per_sequence"] - 1)
        assert model["phases"]["generate_float32"]["decoder_check_max_abs_logprob_diff"] <= gpu_check.DECODER_TOLERANCE
    for name in ("train_padded", "train_packed", "generate_float32", "generate_bfloat16", "n/a"):
        assert name in run.stdout


def test_peak_table_knows_hopper_and_refuses_the_rest(gpu_check):
    assert gpu_check.peak_bf16_flops("NVIDIA H200")[0] == 989.4e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 80GB HBM3")[0] == 989.4e12
    assert gpu_check.peak_bf16_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    for name in ("NVIDIA H200 NVL", "NVIDIA GeForce RTX 4090"):
        peak, why = gpu_check.peak_bf16_flops(name)
        assert peak is None and name in why


def test_training_flops_and_parameter_count(gpu_check):
    spec = gpu_check.ModelSpec("t", "test", 8, 16, 2, 4, 2, 16, 100, True, 1, False)
    dense, attention = gpu_check.training_flops(10, spec, [3, 5])
    assert dense == 6 * 10 * 8
    assert attention == 6 * 2 * 4 * 16 * (3 * 3 + 5 * 5)
    # the published sizes: Qwen3-0.6B 0.6B (0.44B without embeddings), Qwen3-4B 4.0B (3.6B without)
    small, large = gpu_check.MODELS["qwen3-0.6b"], gpu_check.MODELS["qwen3-4b"]
    assert gpu_check.qwen3_parameter_count(small) == 596_049_920
    assert gpu_check.qwen3_parameter_count(large) == 4_022_468_096
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for tied in (True, False):
        spec = gpu_check.ModelSpec("t", "test", 32, 48, 2, 4, 2, 8, 64, tied, 1, False)
        config = Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=tied,
        )
        model = Qwen3ForCausalLM(config)
        assert sum(p.numel() for p in model.parameters()) == gpu_check.qwen3_parameter_count(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_mode_without_a_gpu_says_so(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
