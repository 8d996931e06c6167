"""The `dsv3-lite` command (dsv3_lite.cli, notebook 10), run as `python -m dsv3_lite.cli` and in-process."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

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
    assert main(["generate", "--checkpoint", str(trained / "nope.safetensors"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_prepare_errors(tmp_path):
    r = cli("prepare", "--input", str(tmp_path / "missing.txt"), "--tokenizer", str(SHAKESPEARE_TOKENIZER_FILE),
            "--out", str(tmp_path))
    assert r.returncode == 2 and "missing.txt" in r.stderr and "Traceback" not in r.stderr


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
