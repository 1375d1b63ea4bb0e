"""The curvature loss has the scale of the gradient DHO2 receives, on every route the Trainer and DeepSpeed
take (``ds_dho2.curvature.loss_scale``): the replay drops the global item count, the graph route undoes only
the accumulation scaling DeepSpeed applied."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ds_dho2.curvature.loss_scale import backward_loss_scale
from ds_dho2.hvp.capture import BatchCapture


def _model_and_batch():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 20, (4, 8))
    return model, {"input_ids": ids, "labels": ids}


def test_replay_of_a_trainer_batch_is_the_micro_batch_mean_at_any_world_size(tmp_path) -> None:
    """Under token averaging the Trainer passes ``num_items_in_batch`` (the global token count, here that of
    2 ranks); the batch DHO2 captured replays as the micro-batch's own mean loss, which is the loss the
    Trainer differentiates on one process."""
    model, inputs = _model_and_batch()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], average_tokens_across_devices=True)
    trainer = Trainer(model=model, args=args)
    assert trainer.model_accepts_loss_kwargs
    own_items = torch.tensor(4 * 7)
    one_process_loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=own_items)
    capture = BatchCapture(model)
    model(**inputs, num_items_in_batch=2 * own_items)  # the forward of a 2-rank step
    replayed = capture.replay_closure(1.0)()
    torch.testing.assert_close(replayed, one_process_loss)
    torch.testing.assert_close(replayed, model(**inputs).loss)
    capture.remove()


def test_graph_route_scale_undoes_only_deepspeeds_accumulation_scaling() -> None:
    assert backward_loss_scale(4, scaled_by_engine=True) == 1.0  # DeepSpeed divided by 4 itself
    assert backward_loss_scale(4, scaled_by_engine=False) == 4.0  # the Trainer already divided the loss by 4
    assert backward_loss_scale(1, scaled_by_engine=False) == 1.0
