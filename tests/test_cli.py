"""The `dsv3-lite` command (dsv3_lite.cli, notebook 10), run as `python -m dsv3_lite.cli` and in-process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dsv3_lite.cli import build_parser, main
from dsv3_lite.data import prepare, shakespeare
from dsv3_lite.data.corpus import SHAKESPEARE_TOKENIZER_FILE, shakespeare_tokenizer
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.train import read_checkpoint

FAST = ["--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--threads", "1", "--quiet"]


def cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "dsv3_lite.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    text = shakespeare()
    (d / "a.txt").write_text(text[:150_000], encoding="utf-8")
    (d / "v.txt").write_text(text[-30_000:], encoding="utf-8")
    r = cli("prepare", "--input", str(d / "a.txt"), "--val", str(d / "v.txt"), "--tokenizer",
            str(SHAKESPEARE_TOKENIZER_FILE), "--out", str(d / "data"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "train.bin" in r.stdout and "val.bin" in r.stdout
    return d


@pytest.fixture(scope="module")
def trained(data):
    out = data / "run"
    assert main(["train", "--data", str(data / "data"), "--out", str(out), "--steps", "4", *FAST]) == 0
    return out


def test_help():
    r = cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("prepare", "train", "generate", "demo"))


def _help(capsys, *command) -> str:
    """The --help text of a command, on one line."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["train", "demo"])
def test_help_states_the_out_folder_the_command_uses(command, capsys):
    stated = re.search(r"--out DIR checkpoint folder \(default:? ([^)]+)\)", _help(capsys, command)).group(1)
    assert stated == build_parser().parse_args([command]).out


def test_help_defaults_are_train_config_defaults(capsys):
    """The parser states TrainConfig's defaults without importing it (--help must not load PyTorch)."""
    from dsv3_lite.train import TrainConfig

    cfg = TrainConfig()
    assert f"ModelArgs preset (default {cfg.preset})" in _help(capsys, "train")
    assert f"(default: the last {cfg.val_fraction:.0%} of train)" in _help(capsys, "prepare")


def test_moved_checkpoint_generates_without_its_tokenizer_file(tmp_path, capsys):
    """A checkpoint carries its tokenizer: moved elsewhere, with the tokenizer file it was trained with gone (as on
    another machine), `generate` still works from the checkpoint alone."""
    (tmp_path / "a.txt").write_text(shakespeare()[:60_000], encoding="utf-8")
    tok_file = tmp_path / "tok" / "my_tokenizer.json"
    tok_file.parent.mkdir()
    shutil.copy(SHAKESPEARE_TOKENIZER_FILE, tok_file)
    prepare([tmp_path / "a.txt"], tok_file, tmp_path / "data", workers=1, progress=False)
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "2", *FAST]) == 0
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(tmp_path / "run", moved)
    shutil.rmtree(tmp_path / "tok")
    shutil.rmtree(tmp_path / "data")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(moved / "checkpoint.safetensors"), "--prompt", "ROMEO:",
                 "--max-new-tokens", "5", "--threads", "1"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_train_resume_and_config_mismatch(data, trained, capsys):
    meta = read_checkpoint(trained / "checkpoint.safetensors")[1]
    assert meta["step"] == 4 and meta["config"]["data"] == str(data / "data")
    assert main(["train", "--out", str(trained), "--resume", "--steps", "6", "--quiet", "--threads", "1"]) == 0
    assert read_checkpoint(trained / "checkpoint.safetensors")[1]["step"] == 6
    capsys.readouterr()
    assert main(["train", "--out", str(trained), "--resume", "--lr", "0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3-lite train: error: resume:") and "lr: checkpoint 0.002, now 0.1" in err


def test_generate_plain_speculative_and_too_long_prompt(trained, capsys):
    ckpt = str(trained / "checkpoint.safetensors")
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ROMEO:") and "tokens/s" in out.err
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature",
                 "0", "--speculative"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ROMEO:") and "drafts accepted" in out.err
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "word " * 600]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3-lite generate: error:") and "max_seq_len = 512" in err
    assert main(["generate", "--checkpoint", str(trained / "nope.safetensors"), "--prompt", "x"]) == 3
    assert "not found" in capsys.readouterr().err


def test_prepare_errors(tmp_path):
    r = cli("prepare", "--input", str(tmp_path / "missing.txt"), "--tokenizer", str(SHAKESPEARE_TOKENIZER_FILE),
            "--out", str(tmp_path))
    assert r.returncode == 3 and "missing.txt" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_saves_and_exits_130(data, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "dsv3_lite.cli", "train", "--data", str(data / "data"), "--out",
                          str(out), "--steps", "100000", "--ckpt-every", "1", *FAST], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not (out / "checkpoint.safetensors").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    step = read_checkpoint(out / "checkpoint.safetensors")[1]["step"]
    assert f"interrupted at step {step}" in stdout


def test_demo_runs(tmp_path):
    r = cli("demo", "--minutes", "0.15", "--out", str(tmp_path / "demo"), "--seq-len", "32", "--batch-size", "2",
            "--threads", "1", "--quiet", env={"DSV3_LITE_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--- sample" in r.stdout and "self-speculative" in r.stdout and "same text: True" in r.stdout
    meta = read_checkpoint(tmp_path / "demo" / "checkpoint.safetensors")[1]
    assert meta["step"] >= 5 and meta["history"]["val"]


def test_demo_samples_with_the_tokenizer_of_its_data(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text(shakespeare()[:60_000], encoding="utf-8")
    tok_file = tmp_path / "my_tokenizer.json"
    shutil.copy(SHAKESPEARE_TOKENIZER_FILE, tok_file)
    prepare([tmp_path / "a.txt"], tok_file, tmp_path / "named", workers=1, progress=False)
    prepare([tmp_path / "a.txt"], shakespeare_tokenizer(), tmp_path / "unnamed", workers=1, progress=False)
    opened, from_file = [], BPETokenizer.from_file.__func__
    monkeypatch.setattr(BPETokenizer, "from_file", classmethod(lambda cls, path: opened.append(str(path))
                                                                or from_file(cls, path)))
    demo = ["demo", "--minutes", "0.03", "--seq-len", "32", "--batch-size", "2", "--threads", "1", "--quiet"]
    assert main([*demo, "--data", str(tmp_path / "named"), "--out", str(tmp_path / "run1")]) == 0
    assert opened == [str(tok_file.resolve())]                 # the data's tokenizer, not the bundled one
    assert "--- sample" in capsys.readouterr().out
    assert main([*demo, "--data", str(tmp_path / "unnamed"), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3-lite demo: error: demo: the data") and "names no tokenizer file" in err
    assert (tmp_path / "run2" / "checkpoint.safetensors").is_file()          # the trained model is kept


# --- train never destroys a run ----------------------------------------------------------------------------------

def _run(capsys, *argv) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_train_into_a_folder_with_a_checkpoint_resumes_and_never_replaces_it(data, tmp_path, capsys):
    """`train --steps 6` then `train --steps 2` into the same folder: the second says the run is already at step 6 and
    leaves the checkpoint alone; `--steps 8` continues it (no --resume needed); `--overwrite` starts over."""
    out = tmp_path / "run"
    args = ["train", "--data", str(data / "data"), "--out", str(out), *FAST]
    assert _run(capsys, *args, "--steps", "6")[0] == 0
    ckpt = out / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    status, stdout, _ = _run(capsys, *args, "--steps", "2")
    assert status == 0 and ckpt.read_bytes() == before
    assert f"{ckpt} is already at step 6 of --steps 2: nothing to train" in stdout
    status, stdout, _ = _run(capsys, "train", "--out", str(out), "--steps", "8", "--quiet", "--threads", "1")
    assert status == 0 and f"resuming {ckpt} at step 6 (to step 8)" in stdout
    assert read_checkpoint(ckpt)[1]["step"] == 8
    status, stdout, _ = _run(capsys, *args, "--steps", "2", "--overwrite")
    assert status == 0 and f"starting a new run in {out} (--overwrite): the checkpoint at step 8" in stdout
    assert read_checkpoint(ckpt)[1]["step"] == 2


def test_flag_that_conflicts_with_the_checkpoint_names_flag_values_and_the_way_out(trained, capsys):
    status, _, err = _run(capsys, "train", "--out", str(trained), "--seq-len", "16", "--lr", "0.1", "--quiet")
    assert status == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"dsv3-lite train: error: resume: {trained / 'checkpoint.safetensors'} (step ")
    assert "seq_len: checkpoint 32, now 16 (--seq-len)" in err and "lr: checkpoint 0.002, now 0.1 (--lr)" in err
    assert "--overwrite starts a new run in" in err and "another --out" in err


def test_resume_flag_needs_a_checkpoint(tmp_path, capsys):
    status, _, err = _run(capsys, "train", "--out", str(tmp_path / "none"), "--resume", "--quiet")
    assert status == 3 and err.startswith("dsv3-lite train: error: --resume: no checkpoint at ")
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_demo_twice_replaces_its_own_folder_but_no_other_run(data, tmp_path, monkeypatch, capsys):
    """`dsv3-lite demo` run twice works: its own folder (runs/demo) holds only demos and starts over; a folder given
    with --out that holds a checkpoint is refused before training, unless --overwrite."""
    import dsv3_lite.cli as cli_module

    demo_out = tmp_path / "demo"
    monkeypatch.setattr(cli_module, "DEMO_OUT", str(demo_out))
    demo = ["demo", "--minutes", "0.02", "--seq-len", "32", "--batch-size", "2", "--threads", "1", "--quiet"]
    assert main(["train", "--out", str(demo_out), "--steps", "2", *FAST]) == 0        # a previous demo's checkpoint
    capsys.readouterr()
    status, stdout, err = _run(capsys, *demo)
    assert status == 0, err
    assert f"{demo_out} holds the checkpoint of an earlier demo (step 2): this demo starts over" in stdout
    status, _, err = _run(capsys, *demo, "--out", str(data / "run"))
    assert status == 2 and err.startswith(f"dsv3-lite demo: error: demo: {data / 'run' / 'checkpoint.safetensors'}")
    assert "--overwrite" in err and len(err.splitlines()) == 1


# --- one-line errors with documented exit codes ------------------------------------------------------------------

def test_help_documents_the_exit_codes():
    r = cli("--help")
    text = " ".join(r.stdout.split())
    assert "exit status: 0 done, 1 training diverged, 2 bad input, 3 missing file, 130 interrupted" in text
    assert "--debug" in text
    import dsv3_lite.cli as cli_module

    assert "130 interrupted" in " ".join(cli_module.__doc__.split())


@pytest.mark.parametrize("argv, command, message", [
    (["train", "--threads", "-1"], "train", "argument --threads: -1 is not allowed: an integer >= 1"),
    (["train", "--minutes", "-1"], "train", "argument --minutes: -1 is not allowed: a finite number > 0"),
    (["train", "--minutes", "nan"], "train", "argument --minutes: nan is not allowed: a finite number > 0"),
    (["train", "--lr", "-1"], "train", "argument --lr: -1 is not allowed: a finite number > 0"),
    (["train", "--steps", "2.5"], "train", "argument --steps: '2.5' is not an integer"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "generate",
     "argument --temperature: nan is not allowed: a finite number >= 0"),
    (["generate", "--prompt", "x", "--top-p", "0"], "generate", "argument --top-p: 0 is not allowed: a finite number "
                                                                "> 0 and <= 1"),
    (["prepare", "--input", "a", "--tokenizer", "t", "--out", "o", "--workers", "0"], "prepare",
     "argument --workers: 0 is not allowed: an integer >= 1"),
])
def test_bad_flags_give_one_line_and_status_2(argv, command, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith(f"dsv3-lite {command}: error: {message}")


def test_damaged_checkpoints_give_one_line_status_2_and_debug_shows_the_traceback(data, trained, tmp_path, capsys):
    good = (trained / "checkpoint.safetensors").read_bytes()
    for name, raw in (("empty", b""), ("cut", good[:len(good) // 3])):
        (tmp_path / name).mkdir()
        ckpt = tmp_path / name / "checkpoint.safetensors"
        ckpt.write_bytes(raw)
        for argv in (["train", "--out", str(tmp_path / name), "--resume", "--quiet"],
                     ["generate", "--checkpoint", str(ckpt), "--prompt", "x"]):
            status, _, err = _run(capsys, *argv)
            assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert f"error: checkpoint {ckpt} cannot be read" in err
    from safetensors.torch import save_file

    (tmp_path / "no_step").mkdir()
    meta = read_checkpoint(trained / "checkpoint.safetensors")[1]
    del meta["step"]
    save_file({"model.x": torch.zeros(2)}, tmp_path / "no_step" / "checkpoint.safetensors",
              metadata={"dsv3_lite": json.dumps(meta)})
    status, _, err = _run(capsys, "train", "--out", str(tmp_path / "no_step"), "--quiet")
    assert status == 2 and "its metadata has no 'step'" in err and len(err.splitlines()) == 1
    status, _, err = _run(capsys, "--debug", "train", "--out", str(tmp_path / "no_step"), "--quiet")
    assert status == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("dsv3-lite train: error:")


def test_missing_files_exit_3(tmp_path, capsys):
    status, _, err = _run(capsys, "generate", "--checkpoint", str(tmp_path / "nope.safetensors"), "--prompt", "x")
    assert status == 3 and err.startswith("dsv3-lite generate: error: checkpoint") and "not found" in err
    status, _, err = _run(capsys, "train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o"), "--quiet")
    assert status == 3 and err.startswith("dsv3-lite train: error: TokenFile:") and "nodata" in err


def test_preset_that_cannot_fit_is_refused_with_its_size(tmp_path, capsys):
    status, _, err = _run(capsys, "train", "--preset", "671B", "--out", str(tmp_path / "big"), "--quiet")
    assert status == 2 and len(err.splitlines()) == 1
    assert "preset '671B' needs at least 10.9 TB of memory to train" in err and "this machine has" in err


def test_readme_promises_name_tests_that_exist():
    """Every test the README's "What the package promises" table cites exists (a renamed test breaks the table)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What the package promises")[1].split("\n## ")[0]
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", section)
    assert len(cited) >= 9
    for path, name in cited:
        assert f"def {name}(" in (root / path).read_text(encoding="utf-8"), f"{path}::{name} is cited but missing"
