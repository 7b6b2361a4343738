"""The edges a new user meets: Ctrl-C, a broken or incomplete config.json, a write cut short.

Interrupts are real SIGINTs sent to a CLI running in a subprocess, on a tiny converted checkpoint
(2 layers, dim 128, a byte vocabulary) so that each run takes seconds.
"""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fileio import atomic_write
from loader import load_model
from scripts.convert_gguf import convert
from test_convert_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat by the river stone light north seven quiet".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, calibration text file): a converted 2-layer GGUF and 20,000 random words."""
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_gguf(root / "tiny.gguf")
    convert(root / "tiny.gguf", root / "ckpt")
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(20000)))
    return root / "ckpt", root / "text.txt"


def previous_file(path: Path) -> bytes:
    """A stand-in for an earlier sparsity file: random content, so a partial overwrite shows."""
    data = json.dumps(dict(previous=[random.random() for _ in range(200)])).encode() + b"\n"
    path.write_bytes(data)
    return data


def start(*args) -> subprocess.Popen:
    # SIGINT back to its default in the child: a runner that ignores it (a background job) would
    # otherwise pass SIG_IGN on, and Python then never raises KeyboardInterrupt. One thread: the
    # model is tiny, and on a shared machine more threads only wait for each other.
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_after(proc: subprocess.Popen, marker: str, timeout: float = 300) -> tuple:
    """Send SIGINT once a stdout line holds marker; (returncode, stdout, stderr)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + out, err


def message_lines(stderr: str) -> list:
    """stderr's lines, less the progress bars (tqdm redraws a line with carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1] for line in stderr.splitlines()]
    return [line for line in lines if line.strip() and "|" not in line]


def assert_clean_interrupt(rc: int, stderr: str, doing: str):
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert message_lines(stderr) == [f"interrupted: {doing}"], stderr
    assert rc == 130, (rc, stderr)


# ---------------------------------------------------------------------------- Ctrl-C

def test_sigint_mid_calibration_exits_130_and_keeps_the_old_file(tiny):
    ckpt, text = tiny
    out = ckpt.parent / "interrupted" / "sparsity.json"
    out.parent.mkdir()
    old = previous_file(out)
    proc = start("calibrate.py", "--checkpoint_path", ckpt, "--data", text, "--tokens", 4096, "--seq_len", 128,
                 "--device", "cpu", "--out", out)
    rc, stdout, stderr = interrupt_after(proc, "sequences x")  # printed just before the statistics pass
    assert "Calibrated" not in stdout, "finished before the signal: the test would prove nothing"
    assert_clean_interrupt(rc, stderr, "calibrating")
    assert out.read_bytes() == old
    assert sorted(p.name for p in out.parent.iterdir()) == ["sparsity.json"]  # no temporary file left


# The write itself cut short: half of the new file is on disk when the SIGINT arrives.
INTERRUPTED_WRITE = """
import os, pathlib, signal, sys, time
write_text = pathlib.Path.write_text

def interrupted_write(self, text, *args, **kwargs):
    if "sparsity" not in self.name:
        return write_text(self, text, *args, **kwargs)
    write_text(self, text[: len(text) // 2], *args, **kwargs)
    print("half written", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)  # KeyboardInterrupt is raised here

pathlib.Path.write_text = interrupted_write
import calibrate
calibrate.main(sys.argv[1:])
"""


def test_sigint_while_writing_the_sparsity_file_keeps_the_old_one(tiny):
    ckpt, text = tiny
    out = ckpt.parent / "half" / "sparsity.json"
    out.parent.mkdir()
    old = previous_file(out)
    proc = start("-c", INTERRUPTED_WRITE, "--checkpoint_path", ckpt, "--data", text, "--tokens", 256,
                 "--seq_len", 64, "--greedy_seqs", 1, "--greedy_tokens", 4, "--step", 0.1, "--device", "cpu",
                 "--out", out)
    stdout, stderr = proc.communicate(timeout=300)
    assert "half written" in stdout, stderr
    assert_clean_interrupt(proc.returncode, stderr, "calibrating")
    assert out.read_bytes() == old
    assert sorted(p.name for p in out.parent.iterdir()) == ["sparsity.json"]


def test_sigint_during_generation_exits_130_with_one_line(tiny):
    ckpt, _ = tiny
    proc = start("generate.py", "--checkpoint_path", ckpt, "--device", "cpu", "--prompt", "the cat",
                 "--max_new_tokens", 4000, "--num_samples", 100, "--ignore_eos")
    rc, stdout, stderr = interrupt_after(proc, "Loaded")
    assert "Average tokens/s" not in stdout
    assert_clean_interrupt(rc, stderr, "generating")
    assert stderr.strip() == "interrupted: generating"  # nothing else at all: generate draws no progress bar


# ---------------------------------------------------------------------------- config.json

def copy_checkpoint(src: Path, dst: Path, config_text: str) -> Path:
    dst.mkdir()
    for name in ("model.safetensors", "tokenizer_bpe.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "config.json").write_text(config_text)
    return dst


def cli_error(*args) -> str:
    """generate.py's one-line exit message, in-process (no torch start-up per case)."""
    from generate import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


@pytest.mark.parametrize("text", ["", '{"block_size": 4096,', "[4096, 262]", "\x00\x01 not json"])
def test_config_that_is_not_a_json_object_is_one_line_naming_the_file(tiny, tmp_path, text):
    ckpt = copy_checkpoint(tiny[0], tmp_path / "ckpt", text)
    message = cli_error("--checkpoint_path", ckpt, "--device", "cpu")
    assert message.startswith(f"error: {ckpt / 'config.json'} ") and "convert the checkpoint again" in message


@pytest.mark.parametrize("key", ["rope_base", "block_size", "norm_eps", "rope_scaling", "head_dim"])
def test_config_missing_a_hyperparameter_is_one_line_naming_file_and_key(tiny, tmp_path, key):
    config = json.loads((tiny[0] / "config.json").read_text())
    assert key in config  # the converter wrote it
    del config[key]
    ckpt = copy_checkpoint(tiny[0], tmp_path / "ckpt", json.dumps(config))
    message = cli_error("--checkpoint_path", ckpt, "--device", "cpu")
    assert f"{ckpt / 'config.json'}: missing '{key}'" in message and "convert the checkpoint again" in message
    with pytest.raises(ValueError, match=f"missing '{key}'"):
        load_model(ckpt, "cpu", torch.float32)


def test_config_with_a_wrong_type_names_the_key(tiny, tmp_path):
    config = json.loads((tiny[0] / "config.json").read_text())
    for key, value in (("rope_base", None), ("n_layer", 2.5), ("tie_embeddings", 0), ("rope_scaling", {"factor": 8})):
        ckpt = copy_checkpoint(tiny[0], tmp_path / key, json.dumps(dict(config, **{key: value})))
        with pytest.raises(ValueError, match=f"config.json: '{key}' must be"):
            load_model(ckpt, "cpu", torch.float32)


def test_converted_config_loads_and_unknown_fields_are_refused(tiny, tmp_path):
    model = load_model(tiny[0], "cpu", torch.float32)
    assert model.args.rope_base == 500000.0 and model.args.block_size == 4096  # from the GGUF, not defaults
    config = json.loads((tiny[0] / "config.json").read_text())
    ckpt = copy_checkpoint(tiny[0], tmp_path / "ckpt", json.dumps(dict(config, colour="blue")))
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        load_model(ckpt, "cpu", torch.float32)


def test_hf_converter_guesses_nothing_transformers_would_not():
    from scripts.convert_hf_checkpoint import model_args_from_hf

    rng = random.Random(1)
    hf = dict(model_type="llama", num_attention_heads=8, num_hidden_layers=rng.randint(2, 40), hidden_size=512,
              intermediate_size=1376, vocab_size=rng.randint(1000, 50000), max_position_embeddings=4096,
              rms_norm_eps=1e-5)  # Llama-2's config.json has no rope_theta: transformers takes 10000
    args = model_args_from_hf(hf)
    assert (args.rope_base, args.norm_eps, args.block_size) == (10000.0, 1e-5, 4096)
    assert (args.n_layer, args.vocab_size, args.n_local_heads) == (hf["num_hidden_layers"], hf["vocab_size"], 8)
    for key in ("rms_norm_eps", "max_position_embeddings", "hidden_size"):
        with pytest.raises(ValueError, match=f"no '{key}'"):
            model_args_from_hf({k: v for k, v in hf.items() if k != key})


# ---------------------------------------------------------------------------- atomic_write

def test_atomic_write_keeps_the_old_file_when_the_body_fails(tmp_path):
    path = tmp_path / "results.json"
    old = previous_file(path)
    for failure in (ValueError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with atomic_write(path) as tmp:
                tmp.write_text('{"half": [0.31, 0.')
                raise failure
        assert path.read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with atomic_write(path) as tmp:
        tmp.write_text("new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_write_writes_through_a_symlink(tmp_path):
    target = tmp_path / "real" / "sparsity.json"
    target.parent.mkdir()
    previous_file(target)
    (tmp_path / "link.json").symlink_to(target)
    with atomic_write(tmp_path / "link.json") as tmp:
        tmp.write_text("new\n")
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new\n"


def test_atomic_write_gives_a_new_file_the_usual_permissions(tmp_path):
    from safetensors.torch import save_file

    with atomic_write(tmp_path / "model.safetensors") as tmp:
        save_file({"w": torch.randn(3, 5)}, str(tmp))  # safetensors itself creates files owner-only
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
