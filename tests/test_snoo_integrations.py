"""SNOO inside the trainers users wrap it in: they step it, schedule it, save and reload it.

Each test trains an uninterrupted run and a run stopped at a checkpoint in the middle of a SNOO
cycle and resumed by the trainer's own machinery; both must end at the same weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from snoo_train.optim import SNOO

K, STEPS, SAVE_AT = 4, 8, 3  # the resume happens one step before the first outer step


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    )


def snoo_with_schedule(model: torch.nn.Module):
    opt = SNOO(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K, lr=0.7, momentum=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return opt, sched


def token_rows(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 32, (8,), generator=g) for _ in range(n)]


# -- transformers' Trainer ------------------------------------------------------------------


def _hf_train(tmp_path, resume_from=None, max_steps=STEPS):
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": r, "labels": r} for r in token_rows(2 * STEPS)]
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
        save_strategy="steps", save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=snoo_with_schedule(model))
    trainer.train(resume_from_checkpoint=resume_from)
    return model, trainer


def test_transformers_trainer_steps_schedules_and_resumes_snoo(tmp_path):
    full, trainer = _hf_train(tmp_path / "full")
    opt = trainer.optimizer
    groups = opt.param_groups
    assert groups[0]["snoo_step"] == STEPS
    assert groups[0]["lr"] == pytest.approx(1e-2 / (1 + STEPS))  # the scheduler drove the inner lr

    _hf_train(tmp_path / "resumed", max_steps=SAVE_AT)
    resumed, _ = _hf_train(tmp_path / "resumed", resume_from=str(tmp_path / "resumed" / f"checkpoint-{SAVE_AT}"))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


# -- Lightning ----------------------------------------------------------------------------


def _lightning_train(tmp_path, ckpt_path=None, max_steps=STEPS):
    import lightning as L

    class LitLlama(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            opt, sched = snoo_with_schedule(self.model)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Every batch is the same two rows: Lightning restarts a plain DataLoader's epoch on resume,
    # and this test is about the optimizer's state, not the data position.
    loader = torch.utils.data.DataLoader(token_rows(2) * STEPS, batch_size=2, shuffle=False)
    module = LitLlama()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=SAVE_AT, save_top_k=-1, filename="{step}"
    )
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoint],
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_steps_schedules_and_resumes_snoo(tmp_path):
    full, trainer = _lightning_train(tmp_path / "full")
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["snoo_step"] == STEPS
    assert all("snoo_slow" in opt.state[p] for p in full.parameters())  # closure steps join too

    _lightning_train(tmp_path / "resumed", max_steps=SAVE_AT)
    resumed, _ = _lightning_train(tmp_path / "resumed2", ckpt_path=str(tmp_path / "resumed" / f"step={SAVE_AT}.ckpt"))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
