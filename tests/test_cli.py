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
    assert rc == 0 and out.rstrip("\n") == a["text"]
    assert "graph cache:" in err and "hits" in err and "decode:" in err and "backend: " in err


def test_generate_with_messages_file(tiny_llama, capsys, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    rc, out, _ = gen(capsys, tiny_llama[0], "--messages", str(msgs), "-n", "3", "--temp", "0", "--json")
    assert rc == 0
    from kvgraph.api import LLM
    expected = LLM(str(tiny_llama[0])).chat_prompt_ids([{"role": "user", "content": "hi"}])
    assert json.loads(out)["prompt_ids"] == expected


@pytest.mark.parametrize("args,needle", [
    (["x", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["x", "-c", "4", "-n", "10"], "context size is 4"),
    (["-f", "/nonexistent/prompt.txt"], "cannot read"),
    (["--messages", "/nonexistent.json"], "cannot read"),
    (["x", "--ubatch", "0"], "--ubatch must be >= 1"),
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
    assert exc.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'abc'" in err


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
