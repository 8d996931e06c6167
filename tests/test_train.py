"""The training loop (dsv3_lite.train, notebook 10): schedule, objective, checkpoints, exact resume, faults."""

import dataclasses
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dsv3_lite.data import prepare, shakespeare
from dsv3_lite.data.corpus import SHAKESPEARE_TOKENIZER_FILE, shakespeare_tokenizer
from dsv3_lite.train import (
    TrainConfig,
    Trainer,
    TrainingError,
    checkpoint_tokenizer,
    compute_loss,
    load_model,
    lr_at,
    make_optimizer,
    read_checkpoint,
    save_checkpoint,
)

MODEL = {"n_layers": 2, "dim": 64, "inter_dim": 128, "moe_inter_dim": 32, "q_lora_rank": 32, "kv_lora_rank": 32,
         "max_seq_len": 64, "original_seq_len": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "t.txt").write_text(shakespeare()[:200_000], encoding="utf-8")
    prepare([d / "t.txt"], str(SHAKESPEARE_TOKENIZER_FILE), d, name="train", workers=1, progress=False)
    return str(d)


def cfg(data, **kw):
    base = dict(model=MODEL, data=data, batch_size=4, seq_len=32, steps=6, warmup=2, eval_every=3, eval_batches=1,
                ckpt_every=3)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule():
    c = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, c) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[100] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="TrainConfig.batch_size=0"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="TrainConfig.warmup=10"):
        TrainConfig(steps=10, warmup=10).validate()
    with pytest.raises(ValueError, match="TrainConfig.seq_len=600.*max_seq_len - 1 = 511"):
        TrainConfig(seq_len=600).validate()


def test_objective_at_init_and_weight_decay_groups(data):
    t = Trainer(cfg(data))
    x, y = torch.randint(0, 2048, (4, 32)), torch.randint(0, 2048, (4, 32))
    t.recorder.active = True
    out = compute_loss(t.model, x, y, t.cfg, t.recorder)
    t.recorder.active = False
    ln_v = np.log(2048)
    assert abs(out["main"].item() - ln_v) < 0.05 and abs(out["mtp"].item() - 0.3 * ln_v * 31 / 32) < 0.05
    assert 0 < out["balance"].item() < 1e-3 and len(t.recorder.records) == 2   # 1 MoE layer + the MTP block
    opt, names = make_optimizer(t.model, t.cfg)
    no_decay = names[len(opt.param_groups[0]["params"]):]
    assert all("norm" in n for n in no_decay) and opt.param_groups[1]["weight_decay"] == 0.0


def test_training_learns_and_moves_biases(data):
    t = Trainer(cfg(data, batch_size=8, steps=60, warmup=3, lr=3e-3, eval_every=20, eval_batches=4))
    biases = [g.bias.clone() for g in t.recorder.gates]
    h = t.train()
    assert np.mean(h["main"][:5]) - np.mean(h["main"][-5:]) > 0.8          # from ~ln V = 7.62 to the unigram level
    assert h["val"][-1] < np.log(2048) - 0.8 and h["val_step"] == [20, 40, 60]
    assert all(not torch.equal(b, g.bias) for b, g in zip(biases, t.recorder.gates, strict=True))
    assert all(g.bias.abs().max() <= 60 * 1e-3 + 1e-6 for g in t.recorder.gates)


def test_exact_resume(data, tmp_path):
    straight = Trainer(cfg(data), tmp_path / "a")
    losses = straight.train()["loss"]
    first = Trainer(cfg(data), tmp_path / "b")
    first.train(steps=3)
    resumed = Trainer(cfg(data), tmp_path / "b", resume=True)
    assert resumed.step == 3
    assert resumed.train()["loss"] == losses                  # bit for bit
    for (n, p), (_, q) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_checkpoint_is_safetensors_without_pickle(data, tmp_path):
    t = Trainer(cfg(data, steps=3), tmp_path)
    t.train()
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(path, framework="pt") as f:
        kinds = {k.split(".")[0] for k in f.keys()}
        assert kinds == {"model", "optim", "rng"} and "dsv3_lite" in f.metadata()
        assert "model.layers.1.ffn.gate.bias" in f.keys() and "model.mtp.layers.0.eh_proj.weight" in f.keys()
    model, meta = load_model(path)
    assert meta["step"] == 3 and meta["model_args"]["dim"] == 64
    x = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), t.model.eval()(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]



def test_checkpoint_carries_its_tokenizer(data, tmp_path):
    t = Trainer(cfg(data, steps=3), tmp_path)
    t.train(steps=1)
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["tokenizer.json"] == SHAKESPEARE_TOKENIZER_FILE.read_text(encoding="utf-8")
    tok, shipped = checkpoint_tokenizer(path), shakespeare_tokenizer()
    assert (tok.vocab, tok.merges, tok.special_tokens) == (shipped.vocab, shipped.merges, shipped.special_tokens)


def test_checkpoint_without_a_stored_tokenizer_uses_the_file_it_names(data, tmp_path):
    """Checkpoints written before they carried their tokenizer name a file: used while it exists, else a clear error."""
    t = Trainer(cfg(data, steps=3), tmp_path)
    t.train(steps=1)
    tok_file = tmp_path / "tok.json"
    shutil.copy(SHAKESPEARE_TOKENIZER_FILE, tok_file)
    old = save_checkpoint(tmp_path / "old.safetensors", t.model, t.optimizer, t.param_names,
                          {**t._meta(), "tokenizer": str(tok_file)}, {"batches": t.gen.get_state()})
    with safe_open(old, framework="pt") as f:
        assert "tokenizer.json" not in f.metadata()
    assert checkpoint_tokenizer(old).vocab == shakespeare_tokenizer().vocab
    tok_file.unlink()
    with pytest.raises(ValueError, match=f"checkpoint {old} holds no tokenizer and the file it names, {tok_file}, "
                                         "does not exist: give the tokenizer.json"):
        checkpoint_tokenizer(old)
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoint_tokenizer(tmp_path / "nope.safetensors")


def test_tokenizer_of_the_data_changed_or_gone(tmp_path):
    """A tokenizer file edited after `prepare` is refused; one that is gone is fine, and a resumed run keeps the copy
    its checkpoint carries."""
    (tmp_path / "t.txt").write_text(shakespeare()[:60_000], encoding="utf-8")
    tok_file = tmp_path / "tok.json"
    shutil.copy(SHAKESPEARE_TOKENIZER_FILE, tok_file)
    prepare([tmp_path / "t.txt"], tok_file, tmp_path / "data", workers=1, progress=False)
    data = str(tmp_path / "data")
    Trainer(cfg(data), tmp_path / "run").train(steps=3)
    tok_file.write_text(tok_file.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"Trainer: the tokenizer {tok_file} changed after .*train.bin was prepared"):
        Trainer(cfg(data), tmp_path / "run", resume=True)
    tok_file.unlink()
    resumed = Trainer(cfg(data), tmp_path / "run", resume=True)
    resumed.train()
    assert resumed.step == 6
    assert checkpoint_tokenizer(tmp_path / "run" / "checkpoint.safetensors").vocab == shakespeare_tokenizer().vocab


def test_atomic_write_keeps_old_checkpoint(data, tmp_path, monkeypatch):
    t = Trainer(cfg(data, steps=6), tmp_path)
    t.train(steps=3)
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    assert read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


def test_resume_with_another_config_is_refused(data, tmp_path):
    Trainer(cfg(data), tmp_path).train(steps=3)
    with pytest.raises(ValueError, match=r"another configuration \(batch_size: checkpoint 4, now 8; lr: "):
        Trainer(cfg(data, batch_size=8, lr=1e-3), tmp_path, resume=True)
    with pytest.raises(ValueError, match="model: checkpoint"):
        Trainer(cfg(data, model={**MODEL, "n_layers": 3}), tmp_path, resume=True)
    assert Trainer(cfg(data, steps=9, eval_every=5), tmp_path, resume=True).step == 3   # allowed changes
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(cfg(data), tmp_path / "empty", resume=True)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_stops_and_keeps_last_good_checkpoint(data, tmp_path, where):
    t = Trainer(cfg(data), tmp_path)
    t.train(steps=3)
    with torch.no_grad():
        if where == "loss":
            t.model.head.weight.fill_(float("nan"))
        else:  # finite forward, infinite gradient: scale a loss term by inf through a hook on the head's output
            t.model.head.register_full_backward_hook(lambda m, gi, go: (gi[0] * float("inf"),))
    with pytest.raises(TrainingError, match=f"training stopped at step 4: the {where}.*step 3\\) is kept"):
        t.train()
    assert read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["step"] == 3


def test_ctrl_c_saves_and_returns(data, tmp_path):
    def press(trainer, rec):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    t = Trainer(cfg(data), tmp_path)
    t.train(on_step=press)
    assert t.interrupted and t.step == 2
    assert read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before
    assert dataclasses.asdict(t.cfg) == read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["config"]


def test_minutes_fit_the_schedule_to_the_clock(data, monkeypatch):
    """With `fit_schedule` the cosine is fitted to the clock and the run stops when the minutes are spent. A fake
    clock (0.2 s per step) makes it independent of the machine's speed: a 3 s budget holds about 15 steps."""
    import types

    import dsv3_lite.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    t = Trainer(cfg(data, steps=10 ** 6, warmup=2, eval_every=10 ** 5, ckpt_every=10 ** 5))
    step = t.train_step

    def timed_step():
        clock[0] += 0.2
        return step()

    t.train_step = timed_step
    h = t.train(minutes=0.05, fit_schedule=True)
    assert 10 <= t.step <= 16 and t.cfg.steps == t.step         # the cosine ends where the clock did
    assert h["val_step"] == [t.step] and h["lr"][-1] < 0.5 * t.cfg.lr
    with pytest.raises(ValueError, match="fit_schedule"):
        t.train(fit_schedule=True)


def test_refit_on_the_last_step_extends_the_run_before_it_ends(data, monkeypatch):
    """`fit_schedule` re-fits the end of the cosine every 10 steps. When a re-fit falls on the step where the previous
    fit ended, the run must be extended first, not evaluated there as if it had ended. A fake clock makes it
    deterministic: steps take 1 s until step 13 (the fit then ends at step 23), 0.5 s after (at step 23 there is time
    left: the re-fit moves the end to 29)."""
    import types

    import dsv3_lite.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    t = Trainer(cfg(data, steps=10 ** 6, warmup=2, eval_every=10 ** 5, ckpt_every=10 ** 5))
    step = t.train_step

    def timed_step():
        clock[0] += 1.0 if t.step < 13 else 0.5
        return step()

    t.train_step = timed_step
    h = t.train(minutes=22.5 / 60, fit_schedule=True)
    assert t.step == t.cfg.steps == 29 and h["val_step"] == [29]
