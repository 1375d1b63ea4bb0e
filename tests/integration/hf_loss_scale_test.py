"""DHO2's refresh loss under the HF Trainer has the scale of the loss the Trainer differentiates."""

from __future__ import annotations

import types

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ds_dho2.integrations.hf import scaled_trainer_loss, trainer_loss_scale


def _model_and_batch():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 20, (4, 8))
    return model, {"input_ids": ids, "labels": ids}


def test_refresh_loss_matches_trainer_compute_loss_with_token_averaging(tmp_path, monkeypatch) -> None:
    model, inputs = _model_and_batch()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], average_tokens_across_devices=True)
    trainer = Trainer(model=model, args=args)
    assert trainer.model_accepts_loss_kwargs
    # The Trainer multiplies by the number of processes; pretend there are 2 (the global token count is the
    # sum over both processes, here twice this batch's).
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    items = torch.tensor(2 * 4 * 7)
    trainer_loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=items)
    kwargs = {**inputs, "num_items_in_batch": items}
    refresh_loss = scaled_trainer_loss(model(**kwargs), (), kwargs, scale=trainer_loss_scale(
        types.SimpleNamespace(average_tokens_across_devices=True, world_size=2)))
    torch.testing.assert_close(refresh_loss, trainer_loss)
    unscaled = scaled_trainer_loss(model(**kwargs), (), kwargs, scale=1)
    torch.testing.assert_close(refresh_loss, 2 * unscaled)


def test_no_scaling_without_token_averaging_or_loss_kwargs() -> None:
    assert trainer_loss_scale(types.SimpleNamespace(average_tokens_across_devices=False, world_size=4)) == 1
    assert trainer_loss_scale(types.SimpleNamespace(average_tokens_across_devices=True, world_size=4)) == 4
    model, inputs = _model_and_batch()
    output = model(**inputs)
    torch.testing.assert_close(scaled_trainer_loss(output, (), inputs, scale=4), output.loss)
