"""LoRA: only adapters train, checkpoints in PEFT layout round-trip exactly, merge-to-full is exact."""

import json
import shutil

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from rl_core.config import AlgorithmConfig, LoraConfig, OptimizerConfig, RunConfig
from rl_core.model.generation import generate_batch
from rl_core.model.lora import apply_lora, is_lora, merge_to_full
from rl_core.model.policy import load_policy, save_policy
from rl_core.runs.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from rl_core.trainer import Trainer, make_optimizer
from tests.test_trainer import make_episodes

LORA = LoraConfig(enabled=True, rank=4, alpha=8)
TARGETS = set(LORA.target_modules)


def tokens(policy):
    ids = policy.tokenizer.encode('CALL get_order {"order_id": "4821"} ANSWER {"decision": "refund"}')
    return torch.tensor([ids, ids[::-1]])


def logits(policy):
    with torch.no_grad():
        return policy.model(input_ids=tokens(policy)).logits


def toy_step(policy, lr=1e-2, steps=1):
    """`steps` AdamW steps on a next-token loss over the trainable parameters; returns the optimizer."""
    optimizer = make_optimizer(policy, OptimizerConfig(lr=lr))
    batch = tokens(policy)
    for _ in range(steps):
        out = policy.model(input_ids=batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def snapshot(model, trainable):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def test_only_adapters_are_trainable_and_start_as_the_base(tiny_policy):
    before = logits(tiny_policy)
    n_base = sum(p.numel() for p in tiny_policy.model.parameters())
    policy = apply_lora(tiny_policy, LORA)
    assert is_lora(policy.model)
    trainable = snapshot(policy.model, trainable=True)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == TARGETS
    # rank 4 on 2 layers x (4 attention 32x32 + 3 MLP 32<->64 projections)
    per_layer = 4 * 4 * (32 + 32) + 3 * 4 * (32 + 64)
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer
    assert sum(p.numel() for n, p in policy.model.named_parameters() if not p.requires_grad) == n_base
    optimizer = make_optimizer(policy, OptimizerConfig())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 2 * per_layer
    torch.testing.assert_close(logits(policy), before, rtol=0, atol=0)  # B = 0 at init


def test_a_step_moves_the_adapter_and_leaves_the_base(tiny_policy):
    policy = apply_lora(tiny_policy, LORA)
    base, adapter = snapshot(policy.model, False), snapshot(policy.model, True)
    toy_step(policy)
    for name, value in snapshot(policy.model, False).items():
        assert torch.equal(value, base[name]), name
    after = snapshot(policy.model, True)
    assert all(not torch.equal(after[n], adapter[n]) for n in after if ".lora_B." in n)


def test_trainer_step_trains_only_the_adapter(tiny_policy):
    policy = apply_lora(tiny_policy, LORA)
    base = snapshot(policy.model, False)
    trainer = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-2))
    trainer.step(make_episodes(policy))
    assert policy.version == 1
    assert all(torch.equal(v, base[n]) for n, v in snapshot(policy.model, False).items())
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(snapshot(policy.model, True))


def test_generation_runs_on_a_lora_policy(tiny_policy):
    policy = apply_lora(tiny_policy, LORA)
    prompt = policy.tokenizer.encode("Customer asks for a refund")
    out = generate_batch(
        policy.model, [prompt, prompt], 5, temperature=0.0, stop_id=policy.chat.pad_id, pad_id=policy.chat.pad_id
    )
    assert len(out) == 2 and out[0].tokens == out[1].tokens


def test_checkpoint_round_trip_in_peft_layout(tiny_policy, tmp_path):
    policy = apply_lora(tiny_policy, LORA)
    optimizer = toy_step(policy, steps=2)
    policy.version = 2
    folder = save_checkpoint(tmp_path / "ckpt", policy, optimizer, rng_states={"torch": torch.get_rng_state()})
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()  # the adapter only, not a full copy at the top
    assert (folder / "base" / "config.json").is_file()  # in-memory base: saved once beside the adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert set(config["target_modules"]) == TARGETS
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".lora_" in k and ".default." not in k for k in keys)

    loaded, state = load_checkpoint(folder)
    assert is_lora(loaded.model) and loaded.version == 2 and state["step"] == 2
    torch.testing.assert_close(logits(loaded), logits(policy), rtol=0, atol=0)
    saved, restored = snapshot(policy.model, True), snapshot(loaded.model, True)
    assert saved.keys() == restored.keys()
    for name in saved:
        assert torch.equal(saved[name], restored[name]), name
    assert snapshot(loaded.model, False).keys() == snapshot(policy.model, False).keys()
    fresh = make_optimizer(loaded, OptimizerConfig(lr=1e-2))
    restore_optimizer(folder, fresh)
    for a, b in zip(fresh.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])

    # a base read from a checkpoint's base/ is copied again, so pruning that checkpoint is safe
    loaded.version = 3
    second = save_checkpoint(tmp_path / "ckpt", loaded, None)
    shutil.rmtree(folder)
    again, _ = load_checkpoint(second)
    torch.testing.assert_close(logits(again), logits(policy), rtol=0, atol=0)


def test_a_base_on_disk_is_referenced_by_absolute_path(tiny_policy, tmp_path, monkeypatch):
    save_policy(tiny_policy, tmp_path / "start")
    monkeypatch.chdir(tmp_path)
    policy = load_policy("start", lora=LORA)
    assert is_lora(policy.model)
    assert not is_lora(load_policy("start", lora=LoraConfig()).model)  # disabled: a plain model
    save_policy(policy, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "start").resolve())
    assert not (tmp_path / "adapter" / "base").exists()
    torch.testing.assert_close(logits(load_policy(tmp_path / "adapter")), logits(policy), rtol=0, atol=0)


def test_merge_to_full_gives_a_plain_model_with_the_same_outputs(tiny_policy, tmp_path):
    base_logits = logits(tiny_policy)
    policy = apply_lora(tiny_policy, LORA)
    toy_step(policy, lr=5e-2, steps=3)
    adapted = logits(policy)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapter is not zero any more
    save_policy(policy, tmp_path / "ckpt")
    out = merge_to_full(tmp_path / "ckpt", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = load_policy(out)
    assert not is_lora(merged.model)
    assert all(".lora_" not in k and "base_layer" not in k for k in load_file(out / "model.safetensors"))
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field,value", [("rank", 0), ("alpha", 0), ("dropout", 1.0), ("target_modules", [])])
def test_lora_config_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=rf"policy\.lora\.{field}"):
        RunConfig.model_validate({"policy": {"lora": {field: value}}})


def test_lora_defaults():
    cfg = RunConfig().policy.lora
    assert (cfg.enabled, cfg.rank, cfg.alpha, cfg.dropout) == (False, 32, 64, 0.0)
    assert set(cfg.target_modules) == TARGETS
