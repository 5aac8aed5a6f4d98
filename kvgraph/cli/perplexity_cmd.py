"""`kvgraph perplexity`: llama-perplexity style PPL over a text file, with KL divergence against a baseline."""
from __future__ import annotations

import json
import sys

from ..errors import InvalidArgumentError


def add_perplexity_parser(sub, add_model_args) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (llama-perplexity style)")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many chunks")
    p.add_argument("--save-logits", metavar="FILE.npz", default=None,
                   help="save the scored logits, a baseline for --kl-divergence")
    p.add_argument("--kl-divergence", metavar="FILE.npz", default=None,
                   help="compare with a saved baseline: mean KLD, top-1 agreement, max |dlogit|")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_args(p)
    p.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..perplexity import perplexity
    from .main import _read_text_file, open_llm

    text = _read_text_file(args.file, "-f")
    n_ctx = args.ctx_size or 512
    if args.chunks is not None and args.chunks < 1:
        raise InvalidArgumentError(f"--chunks must be >= 1, got {args.chunks}.")
    llm = open_llm(args, n_ctx=n_ctx, n_ubatch=min(args.ubatch, n_ctx))
    tokens = llm.tokenize(text, add_bos=False, special=False)
    from rich.console import Console

    with Progress(TextColumn("perplexity"), BarColumn(), TextColumn("{task.completed}/{task.total} chunks"),
                  TextColumn("{task.fields[ppl]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("ppl", total=None, ppl="")
        estimates: list[str] = []

        def on_chunk(i, n, ppl):
            estimates.append(f"[{i}]{ppl:.4f}")
            progress.update(task, completed=i, total=n, ppl=f"PPL {ppl:.4f}")

        result = perplexity(llm.ctx, llm.tokenizer, tokens, n_ctx, args.chunks, args.save_logits,
                            args.kl_divergence, on_chunk)
    print(",".join(estimates), file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{len(tokens)} tokens, {result.n_chunks} chunks of {n_ctx}, {result.n_scored} scored")
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
        if result.kl is not None:
            print(result.kl.summary())
    if args.save_logits:
        print(f"logits saved to {args.save_logits}", file=sys.stderr)
    return 0
