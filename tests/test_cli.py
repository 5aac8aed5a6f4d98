"""The command line: generate (streaming and --json), chat, info, models; user errors are one line + exit 1."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvgraph.cli.main import main


def gen(capsys, path, *args):
    rc = main(["generate", "-m", str(path), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_json_is_one_object_with_ids_and_text(tiny_llama, capsys):
    rc, out, _ = gen(capsys, tiny_llama[0], "the cat", "-n", "6", "--temp", "0", "--ignore-eos", "--json")
    assert rc == 0
    obj = json.loads(out)
    assert set(obj) >= {"prompt_ids", "ids", "text"} and len(obj["ids"]) == 6 and obj["prompt_ids"]


def test_generate_streams_text_and_cache_flag_changes_nothing(tiny_llama, capsys):
    args = ("the cat", "-n", "8", "--temp", "0", "--ignore-eos", "--json")
    a = json.loads(gen(capsys, tiny_llama[0], *args)[1])
    b = json.loads(gen(capsys, tiny_llama[0], *args, "--no-graph-cache")[1])
    c = json.loads(gen(capsys, tiny_llama[0], *args, "--flash-attn", "on", "--verify-graph-cache")[1])
    assert a == b == c
    rc, out, err = gen(capsys, tiny_llama[0], "the cat", "-n", "8", "--temp", "0", "--ignore-eos", "--stats")
    assert rc == 0 and out.rstrip("\n") == "the cat" + a["text"]      # the prompt first, as llama-cli
    assert gen(capsys, tiny_llama[0], "the cat", "-n", "8", "--temp", "0", "--ignore-eos",
               "--no-display-prompt")[1].rstrip("\n") == a["text"]
    assert "graph cache:" in err and "hits" in err and "decode:" in err and "backend: " in err


def test_the_kv_cache_type_is_a_flag(tiny_llama, capsys):
    args = ("the cat", "-n", "6", "--temp", "0", "--ignore-eos", "--json", "--backend", "numpy", "-fa", "on")
    f32 = json.loads(gen(capsys, tiny_llama[0], *args, "--cache-type", "f32")[1])
    f16 = json.loads(gen(capsys, tiny_llama[0], *args, "-ctk", "f16")[1])
    assert len(f32["ids"]) == len(f16["ids"]) == 6
    with pytest.raises(SystemExit) as exc:              # argparse: usage line, exit 2
        gen(capsys, tiny_llama[0], *args, "--cache-type", "q4_0")
    assert exc.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err


def test_generate_with_messages_file(tiny_llama, capsys, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    rc, out, _ = gen(capsys, tiny_llama[0], "--messages", str(msgs), "-n", "3", "--temp", "0", "--json")
    assert rc == 0
    from kvgraph.api import LLM
    expected = LLM(str(tiny_llama[0])).chat_prompt_ids([{"role": "user", "content": "hi"}])
    assert json.loads(out)["prompt_ids"] == expected


@pytest.mark.parametrize("args,needle", [
    (["x", "-c", "4", "-n", "10"], "context size is 4"),
    (["-f", "/nonexistent/prompt.txt"], "cannot read"),
    (["--messages", "/nonexistent.json"], "cannot read"),
    ([], "give a prompt"),
])
def test_user_errors_are_one_clear_line(tiny_llama, capsys, args, needle):
    rc, _, err = gen(capsys, tiny_llama[0], *args)
    assert rc == 1 and needle in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_unknown_model_name(capsys):
    assert main(["generate", "-m", "no-such-model", "x"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err


def test_bad_messages_content(tiny_llama, capsys, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps({"not": "a list"}))
    rc, _, err = gen(capsys, tiny_llama[0], "--messages", str(msgs))
    assert rc == 1 and "Traceback" not in err


def test_chat_keeps_history_and_reuses_the_cache(tiny_llama, capsys, monkeypatch):
    lines = iter(["hello there", "/stats", "and again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(tiny_llama[0]), "-n", "4", "--temp", "0", "--ignore-eos"]) == 0
    out = capsys.readouterr()
    assert len([x for x in out.out.splitlines() if x.strip()]) >= 2
    assert "graph cache:" in out.err and "template: gguf" in out.err


def test_chat_commands_answer_and_unknown_ones_are_not_sent_to_the_model(tiny_llama, capsys, monkeypatch):
    lines = iter(["/reset", "/bogus now", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    sent = []
    from kvgraph import api

    monkeypatch.setattr(api.LLM, "stream", lambda self, *a, **k: sent.append(a) or iter(()))
    assert main(["chat", "-m", str(tiny_llama[0]), "-n", "2"]) == 0
    err = capsys.readouterr().err
    assert "[history cleared]" in err and "unknown command '/bogus'" in err and not sent
    assert f"kvgraph chat ({tiny_llama[0].name}," in err and "base model" not in err


def test_chat_says_when_the_model_is_a_base_model(capsys):
    from kvgraph.registry import KNOWN_MODELS, known_spec

    assert not known_spec("gemma3-270m").chat_tuned and known_spec("smollm2-135m").chat_tuned
    assert known_spec(f"/somewhere/{KNOWN_MODELS['gemma3-270m'].filename}").name == "gemma3-270m"
    assert known_spec("/elsewhere/model.gguf") is None and known_spec(None).name == "smollm2-135m"


def test_info_text_and_json(tiny_llama, capsys):
    assert main(["info", str(tiny_llama[0])]) == 0
    out = capsys.readouterr().out
    assert "architecture llama" in out and "tensor types" in out and "chat template: gguf" in out
    assert main(["info", str(tiny_llama[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hyperparameters"]["n_layer"] == 2 and info["tied_output"] and info["n_params"] > 0
    assert info["tensor_types"]["F32"]["count"] > 0


def test_models_lists_known_models(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVGRAPH_HOME", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out


def test_console_script_runs_and_exits_nonzero_on_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "kvgraph.cli.main", "info", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "GGUF" in proc.stderr


def test_bad_flag_value_is_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "x", "-n", "abc"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "expected an integer, got 'abc'" in err


def run_cli(*args, timeout=120, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvgraph.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("args,rc,needle", [
    (["generate", "hi", "--seed", "-5"], 2, "argument --seed: must be between -1 and"),
    (["generate", "hi", "-t", "-3"], 2, "argument -t/--threads: must be >= 1, got -3"),
    (["generate", "hi", "--ubatch", "0"], 2, "argument --ubatch/-ub/--ubatch-size: must be >= 1, got 0"),
    (["serve", "--port", "99999"], 2, "argument --port: must be between 0 and 65535"),
    (["generate", "hi", "--top-p", "7"], 2, "argument --top-p: must be in (0, 1], got 7"),
    (["generate", "hi", "--repeat-penalty", "5e-324"], 2, "argument --repeat-penalty: must be in [0.01, 100]"),
    (["generate", "hi", "--temp", "-1"], 2, "argument --temp: must be in [0, 100], got -1"),
    (["generate", "hi", "--min-p", "nan"], 2, "argument --min-p: must be in [0, 1], got nan"),
    (["generate", "hi", "--backend", "cuda"], 2, "kvgraph has no GPU backend yet"),
    (["chat", "--backend", "tpu"], 2, "unknown backend 'tpu'; choose native, torch, numpy or auto"),
    (["generate", "hi", "-m", "/dev/null"], 1, "/dev/null is not a regular file"),
    (["generate", "hi", "-m", "fifo"], 1, "fifo is not a regular file"),
])
def test_bad_values_are_one_line_in_a_fresh_process(args, rc, needle, tmp_path):
    import os
    os.mkfifo(tmp_path / "fifo")     # an existing relative path that is not a file (never opened)
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == rc and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_a_prompt_longer_than_the_context_with_ctx_shift_gets_the_right_advice(tiny_llama, tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("the cat sat on the mat " * 12)   # over 32 tokens, under 32 x the longest token
    proc = run_cli("generate", "-m", str(tiny_llama[0]), "-f", str(prompt), "-c", "32", "--ctx-shift", "-n", "4")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the prompt itself must fit" in proc.stderr and "pass --ctx-shift" not in proc.stderr


def test_a_huge_prompt_is_refused_before_tokenizing(tiny_llama, tmp_path):
    prompt = tmp_path / "huge.txt"
    prompt.write_text("x" * (64 << 20))          # 64 MB: the tokenizer would need gigabytes for it
    proc = run_cli("generate", "-m", str(tiny_llama[0]), "-f", str(prompt), "-n", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot fit the" in proc.stderr and "tokens of context" in proc.stderr


def test_a_hostile_chat_template_ends_with_a_clear_error(tmp_path):
    from tiny_models import TinySpec, write_tiny_llama
    path = tmp_path / "hostile.gguf"
    write_tiny_llama(path, TinySpec(chat_template="{% for i in range(100000) %}{% for j in range(100000) %}"
                                                  "{% endfor %}{% endfor %}"))
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    proc = run_cli("generate", "-m", str(path), "--messages", str(msgs), "-n", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "chat template" in proc.stderr and "steps" in proc.stderr


def test_ctrl_c_stops_cleanly_and_keeps_what_was_generated(tiny_llama):
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph.cli.main", "generate", "-m", str(tiny_llama[0]), "the cat",
                             "-n", "1000000", "--ignore-eos", "--ctx-shift", "-c", "64", "--temp", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)          # generation is streaming
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(first + out) > 1 and b"interrupted" in err and b"Traceback" not in err


def test_the_prompt_comes_from_stdin_with_a_bare_dash_or_f_dash(tiny_llama, tmp_path):
    prompt = "stdin prompt, two lines\nand the second"
    (tmp_path / "p.txt").write_text(prompt)
    ids = []
    for args, stdin in ((["-f", str(tmp_path / "p.txt")], None), (["-f", "-"], prompt), (["-"], prompt)):
        proc = subprocess.run([sys.executable, "-m", "kvgraph.cli.main", "generate", "-m", str(tiny_llama[0]),
                               "-n", "1", "--temp", "0", "--json", *args], input=stdin, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        ids.append(json.loads(proc.stdout)["prompt_ids"])
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) > 5
