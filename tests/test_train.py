"""The training loop (dsv3_lite.train, notebook 10): schedule, objective, checkpoints, exact resume, faults."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

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


# --- bad configurations, damaged checkpoints, memory, durability -----------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("lr", -1.0, r"TrainConfig.lr=-1.0 is not allowed: a finite float > 0"),
    ("lr", float("nan"), r"TrainConfig.lr=nan is not allowed: a finite float"),
    ("min_lr", float("inf"), r"TrainConfig.min_lr=inf is not allowed: a finite float"),
    ("weight_decay", float("nan"), r"TrainConfig.weight_decay=nan is not allowed: a finite float"),
    ("grad_clip", float("inf"), r"TrainConfig.grad_clip=inf is not allowed: a finite float"),
    ("beta2", 1.0, r"TrainConfig.beta2=1.0 is not allowed: 0 <= beta2 < 1"),
    ("val_fraction", 0.0, r"TrainConfig.val_fraction=0.0 is not allowed: 0 < val_fraction < 1"),
    ("steps", True, r"TrainConfig.steps=True is not allowed: an int \(not a bool or a float\)"),
    ("batch_size", 4.0, r"TrainConfig.batch_size=4.0 is not allowed: an int"),
    ("warmup", 2.5, r"TrainConfig.warmup=2.5 is not allowed: an int"),
    ("lr", "0.1", r"TrainConfig.lr='0.1' is not allowed: a finite float"),
    ("mtp_lambda", False, r"TrainConfig.mtp_lambda=False is not allowed: a finite float"),
    ("seed", -1, r"TrainConfig.seed=-1 is not allowed: 0 <= seed < 2\*\*64"),
    ("preset", 3, r"TrainConfig.preset=3 is not allowed: a str"),
    ("data", 7, r"TrainConfig.data=7 is not allowed: a str or None"),
    ("model", {"n_layer": 2}, r"TrainConfig.model=\{'n_layer': 2\} is not allowed: unknown ModelArgs field 'n_layer'"),
    ("model", [("n_layers", 2)], r"TrainConfig.model=\[\('n_layers', 2\)\] is not allowed: a dict"),
])
def test_config_fields_have_their_type_and_are_finite(field, value, message):
    """Every field of TrainConfig has its declared type (ints are not bools or floats) and every float is finite;
    the error names the field itself (a negative lr names lr, not min_lr)."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).validate()
    TrainConfig(lr=1, min_lr=1, beta1=0).validate()                          # ints are fine where floats are declared


@pytest.mark.parametrize("kw, message", [
    ({"minutes": -1}, r"Trainer.train: minutes=-1 is not allowed: a finite number >= 0"),
    ({"minutes": float("nan")}, r"Trainer.train: minutes=nan is not allowed"),
    ({"steps": 2.5}, r"Trainer.train: steps=2.5 is not allowed: an int >= 0"),
])
def test_train_checks_its_budget_before_a_step(data, kw, message):
    t = Trainer(cfg(data))
    with pytest.raises(ValueError, match=message):
        t.train(**kw)
    assert t.step == 0


def test_preset_too_large_for_this_machine_is_refused_before_allocation(data, monkeypatch):
    """Training needs 16 bytes per parameter (float32 weights, gradients, AdamW's two moments): 671B needs ~11 TB and
    is refused with both sizes before any tensor is allocated. A tight limit also refuses the tiny model."""
    import dsv3_lite.train as train_module

    with pytest.raises(ValueError, match=r"Trainer: preset '671B' needs at least 10.9 TB of memory to train \(682,"
                                         r"636,487,424 parameters × 16 bytes.*but this machine has .* available: "
                                         r"choose a smaller --preset"):
        Trainer(TrainConfig(preset="671B", data=data))
    monkeypatch.setattr(train_module, "available_memory", lambda: 50 * 2 ** 20)
    with pytest.raises(ValueError, match=r"needs at least 9\d.\d MB of memory .* but this machine has 52.4 MB"):
        Trainer(cfg(data, model={}, steps=3))


def _fake_checkpoint(path, meta, tensors=None):
    from safetensors.torch import save_file

    save_file(tensors or {"model.x": torch.zeros(2)}, path, metadata={"dsv3_lite": json.dumps(meta)})
    return path


def test_load_model_checks_memory_before_reading_weights(tmp_path):
    from dsv3_lite.config import ModelArgs

    big = _fake_checkpoint(tmp_path / "big.safetensors",
                           {"model_args": dataclasses.asdict(ModelArgs.preset("671B")), "step": 1})
    with pytest.raises(ValueError, match=rf"load_model: the checkpoint {big} needs at least 2.7 TB of memory to load "
                                         r"\(682,636,487,424 parameters × 4 bytes"):
        load_model(big)


def test_damaged_checkpoints_name_the_file(data, tmp_path):
    """A 0-byte, truncated, non-JSON or incomplete checkpoint gives a ValueError naming the file and what is wrong."""
    t = Trainer(cfg(data, steps=3), tmp_path / "run")
    t.train(steps=1)
    good = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    empty, cut = tmp_path / "empty.safetensors", tmp_path / "cut.safetensors"
    empty.write_bytes(b"")
    cut.write_bytes(good[:len(good) // 2])
    for path in (empty, cut):
        for read in (read_checkpoint, load_model, checkpoint_tokenizer):
            with pytest.raises(ValueError, match=f"checkpoint {path} cannot be read \\(.*\\): the file is truncated "
                                                 "or is not a safetensors file"):
                read(path)
    no_step = _fake_checkpoint(tmp_path / "no_step.safetensors", {"config": {}, "model_args": {}})
    with pytest.raises(ValueError, match=f"checkpoint {no_step}: its metadata has no 'step'"):
        read_checkpoint(no_step)
    from safetensors.torch import save_file

    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"model.x": torch.zeros(2)}, bad_json, metadata={"dsv3_lite": "{not json"})
    with pytest.raises(ValueError, match=f"checkpoint {bad_json}: its 'dsv3_lite' metadata is not JSON"):
        read_checkpoint(bad_json)
    wrong = _fake_checkpoint(tmp_path / "wrong.safetensors", {**read_checkpoint(tmp_path / "run" /
                                                                                  "checkpoint.safetensors")[1]})
    with pytest.raises(ValueError, match=f"load_model: the checkpoint {wrong} does not fit its model_args"):
        load_model(wrong)
    with pytest.raises(ValueError, match=f"resume: {wrong} does not fit this model"):
        Trainer(cfg(data, steps=3), tmp_path / "run").load(wrong)


def test_data_with_a_larger_vocabulary_than_the_model_is_refused(tmp_path):
    from dsv3_lite.tokenizer import BPETokenizer

    base = shakespeare_tokenizer()
    vocab = dict(base.vocab)
    vocab.update({i: b"\xff\xfe" + i.to_bytes(4, "little") for i in range(len(vocab), 3000)})
    (tmp_path / "t.txt").write_text(shakespeare()[:20_000], encoding="utf-8")
    prepare([tmp_path / "t.txt"], BPETokenizer(vocab, base.merges, base.special_tokens), tmp_path / "d", workers=1,
            progress=False)
    with pytest.raises(ValueError, match=r"Trainer: the data .* was prepared with a tokenizer of 3,000 tokens, more "
                                         r"than the model's vocab_size = 2,048"):
        Trainer(cfg(str(tmp_path / "d")))


def test_checkpoint_is_fsynced_before_and_after_the_rename(data, tmp_path, monkeypatch):
    """The temporary file's data reaches the disk before `os.replace`, and the folder's entry after it, so a power
    loss leaves the old checkpoint or the new one."""
    t = Trainer(cfg(data, steps=3), tmp_path)
    t.train(steps=1)
    events, fsync, replace = [], os.fsync, os.replace

    def traced_fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(b).name)) or replace(a, b))
    t.save()
    assert events == [("fsync", "file"), ("replace", "checkpoint.safetensors"), ("fsync", "dir")]


KILL_DURING_SAVE = """
import os, signal, sys
import safetensors.torch
from dsv3_lite.train import TrainConfig, Trainer
cfg = TrainConfig(**__import__("json").loads(sys.argv[1]))
t = Trainer(cfg, sys.argv[2])
t.train(steps=2)                                        # a good checkpoint at step 2
real = safetensors.torch.save_file

def killed_mid_write(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:                    # half written, then the process is killed
        f.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = killed_mid_write
t.train(steps=1)
"""


def test_kill_during_save_keeps_the_checkpoint_and_the_next_start_removes_temporaries(data, tmp_path):
    """SIGKILL in the middle of a save: the previous checkpoint is intact, the half-written temporary file stays
    behind, and the next start (here a resume) removes it."""
    import json as json_module
    import subprocess
    import sys

    config = dataclasses.asdict(cfg(data, steps=6, ckpt_every=1))
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, json_module.dumps(config), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.safetensors"]
    assert leftovers and all(p.startswith(".checkpoint.safetensors.tmp") for p in leftovers)
    assert read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["step"] == 2
    logged = []
    resumed = Trainer(TrainConfig(**config), tmp_path, resume=True, log=logged.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]       # no temporary file left
    assert resumed.step == 2 and any("removed" in line and leftovers[0] in line for line in logged)


def test_temporaries_of_running_processes_are_kept(data, tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()                                                     # a process that has ended: its pid is free
    dead, alive = tmp_path / f".checkpoint.safetensors.tmp{p.pid}", tmp_path / ".checkpoint.safetensors.tmp1"
    other = tmp_path / ".notes.txt.tmp123"
    for f in (dead, alive, other):
        f.write_bytes(b"partial")
    Trainer(cfg(data, steps=3), tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_refused_without_running_it(tmp_path):
    """A pickle under a checkpoint's name (what torch.save writes) is refused as not a safetensors file, and its
    payload never runs: nothing in the package unpickles."""
    import pickle

    marker, ckpt = tmp_path / "payload_ran", tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    for read in (read_checkpoint, load_model, checkpoint_tokenizer):
        with pytest.raises(ValueError, match=f"checkpoint {ckpt} cannot be read .* is not a safetensors file"):
            read(ckpt)
    assert not marker.exists()
