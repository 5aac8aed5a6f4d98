"""Make the golden references of the real models under tests/data/reference/: Hugging Face transformers'
greedy continuations and top-5 logits (float32, weights dequantized from the very GGUF kvgraph loads, eager
attention) for the prompts in prompts.json. The test suite only reads the outputs; this script is how they
were made and how to check or remake them.

Needs, offline from the tests: torch (pip install torch==2.13.0), transformers==5.25.0 (5.24.0 made the
committed files), accelerate and gguf (transformers' GGUF loading), and the models in the kvgraph cache
(kvgraph pull smollm2-135m gemma3-270m).

    python tools/make_golden_references.py                 # write both files
    python tools/make_golden_references.py --check         # recompute and compare with the committed files

Per case: prompt_ids (HF's tokenizer from the GGUF; chat prompts rendered with the model's template, Gemma's
official one for gemma3, whose file has none), exactly n_new greedy tokens (argmax of raw logits, ties to the
lowest id, no end-of-generation stop), each step's top-5 logits (rounded to 4 decimals) and margin (top1 -
top2), and a recompute of the whole sequence in one forward pass as a self-check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference"
GEMMA_CHAT = ("<bos><start_of_turn>user\n{system}{user}<end_of_turn>\n<start_of_turn>model\n")
MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}
N_NEW = {"plain": 32, "chat": 32, "long": 24}


def r4(x: float) -> float:
    return round(float(x), 4)


def top5(logits: np.ndarray) -> list[list]:
    order = np.lexsort((np.arange(logits.shape[0]), -logits))[:5]
    return [[int(i), r4(logits[i])] for i in order]


def load(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvgraph.registry import resolve_model

    path = resolve_model(MODELS[name], progress=True)
    kw = dict(gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, attn_implementation="eager",
                                                 **kw).eval()
    return path, tok, model


def prompt_ids(name: str, tok, kind: str, prompt) -> list[int]:
    if kind == "chat":
        if name == "gemma3":
            system = next((m["content"] + "\n\n" for m in prompt if m["role"] == "system"), "")
            user = next(m["content"] for m in prompt if m["role"] == "user")
            return tok(GEMMA_CHAT.format(system=system, user=user), add_special_tokens=False)["input_ids"]
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt, add_special_tokens=(name == "gemma3"))["input_ids"]


def greedy_case(model, ids: list[int], n_new: int, eog: set[int]) -> dict:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float().numpy()
        steps, new = [], []
        for i in range(n_new):
            tok = int(np.lexsort((np.arange(logits.shape[0]), -logits))[0])
            t5 = top5(logits)
            steps.append({"id": tok, "top5": t5, "margin": r4(logits[t5[0][0]] - logits[t5[1][0]])})
            new.append(tok)
            if i == 0:
                first = logits
            if i + 1 < n_new:
                out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1].float().numpy()
        full = model(torch.tensor([ids + new[:-1]])).logits[0, len(ids) - 1:].float().numpy()
    step_logits = np.stack([full[i] for i in range(n_new)])
    greedy_full = step_logits.argmax(-1)
    return {"greedy_ids": new, "steps": steps, "prompt_top5": steps[0]["top5"],
            "prompt_logits_l2": r4(torch.from_numpy(first).norm()), "prompt_logits_mean": r4(first.mean()),
            "first_eog_step": next((i for i, t in enumerate(new) if t in eog), None),
            "min_margin": min(s["margin"] for s in steps),
            "recompute_argmax_same": bool((greedy_full == np.array(new)).all())}


def make(name: str) -> dict:
    import torch
    import transformers

    from kvgraph.registry import _sha256_file

    prompts = json.loads((OUT / "prompts.json").read_text())
    path, tok, model = load(name)
    eog = {int(tok.eos_token_id)} | ({106} if name == "gemma3" else set())
    cases = []
    for kind in ("plain", "chat", "long"):
        for prompt in prompts[kind]:
            ids = prompt_ids(name, tok, kind, prompt)
            case = {"kind": kind, "prompt": prompt, "prompt_ids": ids, "n_new": N_NEW[kind]}
            case |= greedy_case(model, ids, N_NEW[kind], eog)
            case["greedy_text"] = tok.decode(case["greedy_ids"])
            cases.append(case)
            print(f"{name} {kind}: {len(ids)} prompt tokens, first ids {case['greedy_ids'][:6]}", file=sys.stderr)
    return {"model": name, "gguf_file": path.name, "gguf_sha256": _sha256_file(path, lambda n: None),
            "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "dtype": "float32", "attn_implementation": "eager", "cases": cases}


COMPARED = ("prompt_ids", "greedy_ids", "first_eog_step", "steps", "prompt_top5", "prompt_logits_l2",
            "prompt_logits_mean", "min_margin", "recompute_argmax_same")


def check(name: str, made: dict) -> list[str]:
    """Where the recomputed reference differs from the committed one (empty: it equals it)."""
    old = json.loads((OUT / f"{name}_public.json").read_text())
    diffs = []
    for i, (a, b) in enumerate(zip(old["cases"], made["cases"])):
        diffs += [f"{name} case {i} ({a['kind']}): {key}" + ("" if isinstance(a.get(key), list) else
                                                              f" {a.get(key)} != {b.get(key)}")
                  for key in COMPARED if a.get(key) != b.get(key)]
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    ap.add_argument("models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    failed = []
    for name in args.models:
        made = make(name)
        if args.check:
            failed += check(name, made)
        else:
            (OUT / f"{name}_public.json").write_text(json.dumps(made, ensure_ascii=False, indent=1))
    if args.check:
        print("\n".join(failed) or "the recomputed references equal the committed files")
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
